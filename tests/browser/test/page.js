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

/** `ignoreHTTPSErrors` for a server with a test certificate (wss://). */
async function launch({ ignoreHTTPSErrors = false } = {}) {
  const { chromium } = require('playwright-core');
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'spacegate-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    ignoreHTTPSErrors,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
      '--allow-loopback-in-peer-connection', '--autoplay-policy=no-user-gesture-required',
      '--use-fake-device-for-media-stream=fps=30',
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
      constructor(...args) { super(...args); window.sockets += 1; window.lastSocket = this; }
    };
    // Every peer connection the SDK makes, so tests can read their stats.
    const NativePc = window.RTCPeerConnection;
    window.pcs = [];
    window.RTCPeerConnection = class extends NativePc {
      constructor(...args) { super(...args); window.pcs.push(this); }

      // With window.forceH264 set, offers keep only H.264 (and its RTX) for video, the
      // way an app restricts codecs, so a test can prove H.264 end to end.
      async createOffer(...args) {
        const offer = await super.createOffer(...args);
        if (!window.forceH264) return offer;
        const munged = offer.sdp.split(/\r\n(?=m=)/).map((section) => {
          if (!section.startsWith('m=video')) return section;
          const lines = section.split('\r\n');
          const keep = new Set(lines.map((l) => l.match(/^a=rtpmap:(\d+) H264\//)).filter(Boolean).map((m) => m[1]));
          for (const l of lines) {
            const m = l.match(/^a=fmtp:(\d+) apt=(\d+)/);
            if (m && keep.has(m[2])) keep.add(m[1]);
          }
          return lines.filter((l) => {
            const m = l.match(/^a=(?:rtpmap|fmtp|rtcp-fb):(\d+)/);
            return !m || keep.has(m[1]);
          }).map((l) => {
            if (!l.startsWith('m=video')) return l;
            const parts = l.split(' ');
            return [...parts.slice(0, 3), ...parts.slice(3).filter((pt) => keep.has(pt))].join(' ');
          }).join('\r\n');
        }).join('\r\n');
        return { type: offer.type, sdp: munged };
      }
    };
    window.MUX_SPACES_BACKEND_URL = wsBase;
    const { Space, SpaceEvent } = window.MuxSpaces;
    window.events = [];
    const space = new Space(token, options);
    window.space = space;
    window.people = {};
    space.on(SpaceEvent.ParticipantJoined, (p) => {
      window.people[p.id] = p;
      window.events.push(['joined', p.id, p.displayName]);
    });
    space.on(SpaceEvent.ParticipantLeft, (p) => window.events.push(['left', p.id]));
    space.on(SpaceEvent.ParticipantDisplayNameChanged, (p) => window.events.push(['name', p.id, p.displayName]));
    space.on(SpaceEvent.ParticipantCustomEventPublished, (p, e) => window.events.push(['custom', p.id, e.payload]));
    window.remote = {};
    // The SDK's TrackKind is numeric (1 audio, 2 video); tests speak in names.
    const kindName = (k) => ({ 1: 'audio', 2: 'video' }[k] || String(k));
    space.on(SpaceEvent.ParticipantTrackSubscribed, (p, t) => {
      window.events.push(['subscribed', p.id, kindName(t.kind)]);
      window.remote[`${p.id}/${kindName(t.kind)}`] = t;
    });
    space.on(SpaceEvent.ParticipantTrackUnsubscribed, (p, t) => window.events.push(['unsubscribed', p.id, kindName(t.kind)]));
    space.on(SpaceEvent.ParticipantTrackPublished, (p, t) => window.events.push(['published', p.id, kindName(t.kind)]));
    space.on(SpaceEvent.ParticipantTrackUnpublished, (p, t) => window.events.push(['unpublished', p.id, kindName(t.kind)]));
    space.on(SpaceEvent.ParticipantTrackMuted, (p, t) => window.events.push(['muted', p.id, kindName(t.kind)]));
    space.on(SpaceEvent.ParticipantTrackUnmuted, (p, t) => window.events.push(['unmuted', p.id, kindName(t.kind)]));
    space.on(SpaceEvent.ActiveSpeakersChanged, (s) => window.events.push(['speakers', s.map((x) => x.id).join(',')]));
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

/** Publishes the fake camera and microphone. Resolves with the local track kinds. */
async function publish(page, constraints = { audio: true, video: true }) {
  return page.evaluate(async (c) => {
    const tracks = await window.MuxSpaces.getUserMedia(c);
    window.localTracks = tracks;
    await window.me.publishTracks(tracks);
    return tracks.map((t) => ({ 1: 'audio', 2: 'video' }[t.kind] || String(t.kind)));
  }, constraints);
}

/** Sums inbound RTP over every peer connection of the page: {video: {...}, audio: {...}}. */
async function inbound(page) {
  return page.evaluate(async () => {
    const sum = { video: { framesDecoded: 0, packetsReceived: 0, streams: 0 }, audio: { packetsReceived: 0, streams: 0 } };
    for (const pc of window.pcs) {
      if (pc.connectionState === 'closed') continue;
      const stats = await pc.getStats();
      stats.forEach((s) => {
        if (s.type !== 'inbound-rtp') return;
        const k = sum[s.kind];
        if (!k) return;
        k.streams += 1;
        k.packetsReceived += s.packetsReceived || 0;
        if (s.kind === 'video') {
          k.framesDecoded += s.framesDecoded || 0;
          k.frameWidth = Math.max(k.frameWidth || 0, s.frameWidth || 0);
        }
        // Which codec arrived (mimeType of the stream's codec entry).
        const codec = s.codecId && stats.get(s.codecId);
        if (codec) k.codecs = [...new Set([...(k.codecs || []), codec.mimeType])];
      });
    }
    return sum;
  });
}

/** Waits (bounded) until `check(inbound stats)` holds; returns the stats. */
async function waitForStats(page, check, timeout = 20000) {
  const deadline = Date.now() + timeout;
  let last;
  while (Date.now() < deadline) {
    last = await inbound(page);
    if (check(last)) return last;
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error(`stats never satisfied the check: ${JSON.stringify(last)}`);
}

/** Waits (bounded) until the page has recorded an event matching `match`. */
async function waitForEvent(page, match, timeout = 10000) {
  await page.waitForFunction((m) => window.events.some((e) => m.every((v, i) => v === null || e[i] === v)), match, { timeout });
}

/**
 * Registers the suite's before/after hooks: a spacegate, a mux-node 8 client on it with a
 * signing key and a space, the page server and a browser. Returns the object they are filled into,
 * and `missing` (why the suite is skipped, or null; a failure under SPACEGATE_REQUIRE_ALL).
 */
function useSuite(name, serverOptions = {}) {
  const { before, after } = require('node:test');
  const { startServer } = require('../../clients/test/harness');
  const missing = unavailable();
  if (missing && process.env.SPACEGATE_REQUIRE_ALL === '1') {
    throw new Error(`browser tests cannot run: ${missing}, and SPACEGATE_REQUIRE_ALL=1`);
  }
  if (missing) console.log(`SKIP ${name}: ${missing}`);
  const s = { missing };
  before(async () => {
    if (missing) return;
    s.server = await startServer(serverOptions);
    s.wsBase = s.server.url.replace(/^http/, 'ws');
    const Mux = require('../../clients/node_modules/mux-node-8');
    // With TLS, this process trusts the test certificate for its API calls only.
    const httpAgent = s.server.ca
      ? new (require('node:https').Agent)({ ca: fs.readFileSync(s.server.ca) })
      : undefined;
    s.mux = new Mux({
      tokenId: s.server.tokenId, tokenSecret: s.server.tokenSecret, baseURL: s.server.url, httpAgent,
    });
    s.key = await s.mux.system.signingKeys.create();
    s.space = await s.mux.video.spaces.create();
    s.site = await serveStatic();
    s.browser = await launch({ ignoreHTTPSErrors: !!s.server.ca });
  });
  after(async () => {
    if (s.browser) await s.browser.close();
    if (s.site) s.site.close();
    if (s.server) s.server.stop();
  });
  return s;
}

module.exports = { unavailable, serveStatic, launch, join, waitForEvent, publish, inbound, waitForStats, useSuite };
