// Drives real pages: a tiny page on localhost that loads the SDK's browser bundle from
// node_modules, in Debian's Chromium through playwright-core. One page = one participant.
'use strict';
const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');

const CHROMIUM = process.env.SPACEGATE_CHROMIUM || '/usr/bin/chromium';
const BUNDLE = path.join(__dirname, '../node_modules/@mux/spaces-web/dist/mux-spaces.js');

/** Why the browser tests cannot run here, or null. */
function unavailable() {
  if (!fs.existsSync(CHROMIUM)) return `no Chromium at ${CHROMIUM} (apt-get install chromium)`;
  if (!fs.existsSync(BUNDLE)) return 'no @mux/spaces-web bundle (npm ci in tests/browser)';
  return null;
}

const PAGE = `<!doctype html><html><head><meta charset="utf-8"><title>spacegate test</title></head>
<body><script src="/mux-spaces.js"></script></body></html>`;

/** Serves the page and the bundle on 127.0.0.1 (a secure context, as the SDK needs). */
async function serveStatic() {
  const server = http.createServer((req, res) => {
    if (req.url === '/mux-spaces.js') {
      res.writeHead(200, { 'content-type': 'text/javascript' });
      fs.createReadStream(BUNDLE).pipe(res);
    } else {
      res.writeHead(200, { 'content-type': 'text/html' });
      res.end(PAGE);
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { url: `http://127.0.0.1:${server.address().port}/`, close: () => server.close() };
}

async function launch() {
  const { chromium } = require('playwright-core');
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'spacegate-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
      '--allow-loopback-in-peer-connection',
    ],
  });
  return {
    context,
    close: async () => {
      await context.close();
      fs.rmSync(userDataDir, { recursive: true, force: true });
    },
  };
}

/**
 * Opens a participant page and joins. Resolves with {ok, id, connectionId} or
 * {ok:false, name, message}. The page records SDK events in window.events and counts
 * WebSocket connections in window.sockets.
 */
async function join(context, pageUrl, wsBase, token, options = {}) {
  const page = await context.newPage();
  await page.goto(pageUrl);
  const result = await page.evaluate(async ({ wsBase, token, options }) => {
    const NativeWebSocket = window.WebSocket;
    window.sockets = 0;
    window.WebSocket = class extends NativeWebSocket {
      constructor(...args) { super(...args); window.sockets += 1; }
    };
    window.MUX_SPACES_BACKEND_URL = wsBase;
    const { Space, SpaceEvent } = window.MuxSpaces;
    window.events = [];
    const space = new Space(token, options);
    window.space = space;
    space.on(SpaceEvent.ParticipantJoined, (p) => window.events.push(['joined', p.id, p.displayName]));
    space.on(SpaceEvent.ParticipantLeft, (p) => window.events.push(['left', p.id]));
    space.on(SpaceEvent.ParticipantDisplayNameChanged, (p) => window.events.push(['name', p.id, p.displayName]));
    space.on(SpaceEvent.ParticipantCustomEventPublished, (p, e) => window.events.push(['custom', p.id, e.payload]));
    try {
      const me = await space.join();
      window.me = me;
      return { ok: true, id: me.id, connectionId: me.connectionId };
    } catch (e) {
      return { ok: false, name: e.constructor.name, jwt: e instanceof window.MuxSpaces.JWTError, message: e.message };
    }
  }, { wsBase, token, options });
  return { page, result };
}

/** Waits (bounded) until the page has recorded an event matching `match`. */
async function waitForEvent(page, match, timeout = 10000) {
  await page.waitForFunction((m) => window.events.some((e) => m.every((v, i) => v === null || e[i] === v)), match, { timeout });
}

module.exports = { unavailable, serveStatic, launch, join, waitForEvent };
