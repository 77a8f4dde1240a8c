// Starts a real spacegate binary on a free port with a fresh data dir, and gives tests its
// URL, the bootstrap access token and a way to run the CLI against the same store.
'use strict';
const { spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');

const BIN = process.env.SPACEGATE_BIN
  || path.resolve(__dirname, '../../../target/debug/spacegate');

/**
 * A self-signed certificate for localhost and 127.0.0.1 (openssl), as PEM files in `dir`:
 * {cert, key}. `kind` is 'ec' (P-256) or 'rsa' (2048 bits). The certificate is its own CA:
 * trust it with NODE_EXTRA_CA_CERTS=cert.
 */
function selfSignedCertificate(dir, kind = 'ec') {
  const cert = path.join(dir, `tls-${kind}-cert.pem`);
  const key = path.join(dir, `tls-${kind}-key.pem`);
  const keyArgs = kind === 'rsa'
    ? ['-newkey', 'rsa:2048']
    : ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1'];
  execFileSync('openssl', ['req', '-x509', ...keyArgs, '-nodes', '-keyout', key, '-out', cert,
    '-days', '2', '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1'], { stdio: 'ignore' });
  return { cert, key };
}

/**
 * Starts spacegate; `config` is TOML text for `--config`, if any; `tls` ('ec' or 'rsa')
 * serves HTTPS/WSS with a fresh self-signed certificate (its path is `server.ca`).
 */
async function startServer({ config, tls } = {}) {
  if (!fs.existsSync(BIN)) {
    throw new Error(`spacegate binary not found at ${BIN}: run cargo build first or set SPACEGATE_BIN`);
  }
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'spacegate-clients-'));
  const args = ['serve', '--listen', '127.0.0.1:0', '--data-dir', dataDir];
  if (config) {
    const file = path.join(dataDir, 'spacegate.toml');
    fs.writeFileSync(file, config);
    args.push('--config', file);
  }
  let ca;
  if (tls) {
    const files = selfSignedCertificate(dataDir, tls);
    args.push('--tls-cert', files.cert, '--tls-key', files.key);
    ca = files.cert;
  }
  const child = spawn(BIN, args, {
    env: { ...process.env, SPACEGATE_LOG: process.env.SPACEGATE_LOG || 'warn' },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const lines = readline.createInterface({ input: child.stdout });
  const found = {};
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('spacegate did not start in 30 s')), 30000);
    child.once('exit', (code) => reject(new Error(`spacegate exited early with ${code}`)));
    lines.on('line', (line) => {
      const t = line.trim();
      if (t.startsWith('MUX_TOKEN_ID=')) found.tokenId = t.slice('MUX_TOKEN_ID='.length);
      if (t.startsWith('MUX_TOKEN_SECRET=')) found.tokenSecret = t.slice('MUX_TOKEN_SECRET='.length);
      const m = t.match(/^spacegate: listening on (\S+)$/);
      if (m) {
        found.url = m[1];
        clearTimeout(timer);
        resolve();
      }
    });
  });
  child.removeAllListeners('exit');
  const cli = (...args) => execFileSync(BIN, [...args, '--data-dir', dataDir], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  return {
    ca,
    url: found.url,
    tokenId: found.tokenId,
    tokenSecret: found.tokenSecret,
    cli,
    /** Checks a join token against the server's stored keys; returns its claims. */
    verify: (jwt) => JSON.parse(cli('verify', jwt)),
    /** An extra access token, e.g. read-only. */
    token: (permissions, environment = 'default') => JSON.parse(
      cli('tokens', 'create', '--permissions', permissions, '--environment', environment, '--json'),
    ),
    stop: () => {
      child.kill('SIGTERM');
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** Runs `fn`, expecting it to throw; returns what was thrown. */
async function rejection(fn) {
  try {
    await fn();
  } catch (e) {
    return e;
  }
  throw new Error('expected a rejection');
}

module.exports = { startServer, rejection, selfSignedCertificate };
