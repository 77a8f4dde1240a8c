// Both mux-node versions call the API over https:// (spacegate with --tls-cert/--tls-key),
// trusting the server's certificate the way an app would for a private CA:
// NODE_EXTRA_CA_CERTS, which Node reads only at start, hence a child process.
'use strict';
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { execFile } = require('node:child_process');
const path = require('node:path');
const { startServer } = require('./harness');

let server;
before(async () => {
  server = await startServer({ tls: 'ec' });
});
after(() => server && server.stop());

/** Runs https-client.js with `version` against the server; its JSON result. */
function runClient(version, extraEnv = {}) {
  return new Promise((resolve, reject) => {
    execFile(process.execPath, [path.join(__dirname, 'https-client.js'), version], {
      env: {
        ...process.env,
        NODE_EXTRA_CA_CERTS: server.ca,
        SPACEGATE_URL: server.url,
        MUX_TOKEN_ID: server.tokenId,
        MUX_TOKEN_SECRET: server.tokenSecret,
        ...extraEnv,
      },
    }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${err.message}\n${stderr}`));
      else resolve(JSON.parse(stdout));
    });
  });
}

test('the server says https', () => {
  assert.match(server.url, /^https:\/\/127\.0\.0\.1:\d+$/);
});

for (const version of ['7', '8']) {
  test(`mux-node ${version}: spaces and signing keys over https`, async () => {
    const r = await runClient(version);
    assert.equal(r.created.status, 'idle');
    assert.equal(r.retrieved.id, r.created.id);
    assert.ok(r.listed.includes(r.created.id));
    assert.ok(r.key.id && r.key.hasPrivateKey);
    // The token mux-node signed with that key verifies against the server's store.
    const claims = server.verify(r.jwt);
    assert.equal(claims.space_id, r.created.id);
    assert.equal(r.deleted, true);
  });
}

test('a client that does not trust the certificate is refused by its own TLS check', async () => {
  // Without the CA, Node's TLS check fails: the server's certificate really is checked.
  await assert.rejects(runClient('8', { NODE_EXTRA_CA_CERTS: '' }));
});
