// @mux/spaces-web 1.2.0, unmodified, in headless Chromium: media through spacegate's SFU.
'use strict';
const { test } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { join, waitForEvent, publish, inbound, waitForStats, useSuite } = require('./page');

// Filled by the suite's before hook: env.mux, env.key, env.browser, env.site, env.wsBase.
const env = useSuite('browser media tests');
const { missing } = env;

const sign = (spaceId, params) =>
  env.mux.jwt.signSpaceId(spaceId, { keyId: env.key.id, keySecret: env.key.private_key, expiration: '1h', params });

const ARTIFACTS = path.join(__dirname, '../artifacts');

test('two publishers see and hear each other; mute reaches the other page', { skip: missing || false }, async () => {
  const space = await env.mux.video.spaces.create();
  const a = await join(env.browser.context, env.site.url, env.wsBase, await sign(space.id, { participant_id: 'alice' }));
  assert.equal(a.result.ok, true, JSON.stringify(a.result));
  const b = await join(env.browser.context, env.site.url, env.wsBase, await sign(space.id, { participant_id: 'bob' }));
  assert.equal(b.result.ok, true, JSON.stringify(b.result));
  assert.deepEqual((await publish(a.page)).sort(), ['audio', 'video']);
  assert.deepEqual((await publish(b.page)).sort(), ['audio', 'video']);

  for (const [page, other] of [[a.page, 'bob'], [b.page, 'alice']]) {
    await waitForEvent(page, ['subscribed', other, 'video'], 20000);
    await waitForEvent(page, ['subscribed', other, 'audio'], 20000);
  }
  // Frames decode (so keyframes reached the late subscriber) and audio flows, both ways.
  const sa = await waitForStats(a.page, (s) => s.video.framesDecoded > 30 && s.audio.packetsReceived > 50);
  const sb = await waitForStats(b.page, (s) => s.video.framesDecoded > 30 && s.audio.packetsReceived > 50);
  // The SFU answers with its preferred codec (VP8) and Opus; forwarded as sent.
  assert.deepEqual(sa.video.codecs, ['video/VP8']);
  assert.deepEqual(sb.audio.codecs, ['audio/opus']);
  // And keeps flowing.
  await waitForStats(a.page, (s) => s.video.framesDecoded > sa.video.framesDecoded + 30);
  await waitForStats(b.page, (s) => s.audio.packetsReceived > sb.audio.packetsReceived + 50);

  // Mute / unmute of alice's camera reaches bob as the SDK's events.
  await a.page.evaluate(() => window.localTracks.find((t) => t.kind === 2).mute());
  await waitForEvent(b.page, ['muted', 'alice', 'video']);
  await a.page.evaluate(() => window.localTracks.find((t) => t.kind === 2).unMute());
  await waitForEvent(b.page, ['unmuted', 'alice', 'video']);

  // A page with two remote videos, as an artifact (not asserted on pixels).
  const c = await join(env.browser.context, env.site.url, env.wsBase, await sign(space.id, { participant_id: 'carol' }));
  assert.equal(c.result.ok, true);
  await waitForEvent(c.page, ['subscribed', 'alice', 'video'], 20000);
  await waitForEvent(c.page, ['subscribed', 'bob', 'video'], 20000);
  await waitForStats(c.page, (s) => s.video.framesDecoded > 20);
  await c.page.evaluate(async () => {
    for (const t of Object.values(window.remote).filter((t) => t.kind === 2)) {
      const v = document.createElement('video');
      v.autoplay = true; v.muted = true; v.width = 320; v.height = 240;
      document.body.append(v);
      t.attach(v);
      await new Promise((r) => { if (v.readyState >= 2) r(); else v.onloadeddata = r; });
    }
  });
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  await c.page.screenshot({ path: path.join(ARTIFACTS, 'two-remote-videos.png') });

  await Promise.all([a.page.close(), b.page.close(), c.page.close()]);
});

test('a subscriber-role participant sees the publisher and cannot publish', { skip: missing || false }, async () => {
  const space = await env.mux.video.spaces.create();
  const pub = await join(env.browser.context, env.site.url, env.wsBase, await sign(space.id, { participant_id: 'pub' }));
  await publish(pub.page);
  const sub = await join(env.browser.context, env.site.url, env.wsBase, await sign(space.id, { participant_id: 'viewer', role: 'subscriber' }));
  assert.equal(sub.result.ok, true, JSON.stringify(sub.result));
  await waitForEvent(sub.page, ['subscribed', 'pub', 'video'], 20000);
  await waitForStats(sub.page, (s) => s.video.framesDecoded > 20);
  const refused = await sub.page.evaluate(async () => {
    try {
      await window.me.publishTracks(await window.MuxSpaces.getUserMedia({ audio: true }));
      return null;
    } catch (e) { return e.constructor.name; }
  });
  assert.equal(refused, 'PublishTrackError');
  await Promise.all([pub.page.close(), sub.page.close()]);
});

test('manual mode: nothing until subscribe(), and unsubscribe() stops it', { skip: missing || false }, async () => {
  const space = await env.mux.video.spaces.create();
  const pub = await join(env.browser.context, env.site.url, env.wsBase, await sign(space.id, { participant_id: 'm-pub' }));
  await publish(pub.page);
  const viewer = await join(env.browser.context, env.site.url, env.wsBase, await sign(space.id, { participant_id: 'm-viewer' }),
    { subscriptionMode: 'MANUAL' });
  assert.equal(viewer.result.ok, true, JSON.stringify(viewer.result));
  await waitForEvent(viewer.page, ['joined', 'm-pub', null]);
  // Published but not subscribed: nothing arrives, watched over two seconds (an absence
  // can only be asserted over a window).
  const until = Date.now() + 2000;
  while (Date.now() < until) {
    const s = await inbound(viewer.page);
    assert.equal(s.video.packetsReceived + s.audio.packetsReceived, 0, 'media before subscribe()');
    await new Promise((r) => setTimeout(r, 200));
  }
  await viewer.page.evaluate(async () => {
    const p = window.people['m-pub'];
    await p.subscribe();
  });
  await waitForStats(viewer.page, (s) => s.video.framesDecoded > 10);
  await viewer.page.evaluate(async () => {
    const p = window.people['m-pub'];
    await p.unsubscribe();
  });
  await waitForEvent(viewer.page, ['unsubscribed', 'm-pub', 'video'], 20000);
  await Promise.all([pub.page.close(), viewer.page.close()]);
});

test('automatic mode with automaticParticipantLimit 2 and 4 publishers: at most 2 remote videos', { skip: missing || false }, async () => {
  const space = await env.mux.video.spaces.create();
  const pubs = [];
  for (const id of ['p1', 'p2', 'p3', 'p4']) {
    // Publishers subscribe to nothing (manual mode), to spare the 2-core CI machine.
    const p = await join(env.browser.context, env.site.url, env.wsBase, await sign(space.id, { participant_id: id }),
      { subscriptionMode: 'MANUAL' });
    assert.equal(p.result.ok, true, JSON.stringify(p.result));
    await publish(p.page, { audio: true, video: { width: 320, height: 240 } });
    pubs.push(p);
  }
  const viewer = await join(env.browser.context, env.site.url, env.wsBase, await sign(space.id, { participant_id: 'auto-viewer' }),
    { automaticParticipantLimit: 2 });
  assert.equal(viewer.result.ok, true, JSON.stringify(viewer.result));
  await viewer.page.waitForFunction(
    () => window.events.filter((e) => e[0] === 'subscribed' && e[2] === 'video').length >= 2, null, { timeout: 20000 });
  await waitForStats(viewer.page, (s) => s.video.framesDecoded > 20);
  // Never more than two, watched over two seconds.
  const until = Date.now() + 2000;
  while (Date.now() < until) {
    const videos = await viewer.page.evaluate(() => {
      const live = new Set();
      for (const e of window.events) {
        if (e[2] !== 'video') continue;
        if (e[0] === 'subscribed') live.add(e[1]);
        if (e[0] === 'unsubscribed') live.delete(e[1]);
      }
      return live.size;
    });
    assert.ok(videos <= 2, `${videos} remote videos subscribed`);
    await new Promise((r) => setTimeout(r, 200));
  }
  await Promise.all([...pubs.map((p) => p.page.close()), viewer.page.close()]);
});

test('reconnect: a dropped socket comes back with its participant_id and tracks, and video resumes', { skip: missing || false }, async () => {
  const space = await env.mux.video.spaces.create();
  const a = await join(env.browser.context, env.site.url, env.wsBase, await sign(space.id, { participant_id: 'r-alice' }));
  const b = await join(env.browser.context, env.site.url, env.wsBase, await sign(space.id, { participant_id: 'r-bob' }));
  await publish(a.page);
  await waitForEvent(b.page, ['subscribed', 'r-alice', 'video'], 20000);
  await waitForStats(b.page, (s) => s.video.framesDecoded > 10);
  await a.page.evaluate(() => {
    window.reconnected = false;
    window.space.on(window.MuxSpaces.SpaceEvent.LocalParticipantReconnected, () => { window.reconnected = true; });
    // The network drops the socket: a close that is not 4000 makes the SDK reconnect.
    window.lastSocket.close(3000, 'network drop');
  });
  await a.page.waitForFunction(() => window.reconnected, null, { timeout: 20000 });
  assert.equal(await a.page.evaluate(() => window.me.id), 'r-alice');
  assert.equal(await a.page.evaluate(() => window.sockets), 2, 'one reconnect, no storm');
  // Bob sees alice's re-published video decode again.
  await b.page.waitForFunction(
    () => window.events.filter((e) => e[0] === 'subscribed' && e[1] === 'r-alice' && e[2] === 'video').length >= 2,
    null, { timeout: 20000 });
  const before = await inbound(b.page);
  await waitForStats(b.page, (s) => s.video.framesDecoded > before.video.framesDecoded + 20);
  await Promise.all([a.page.close(), b.page.close()]);
});

test('H.264 from a publisher that offers only H.264 is forwarded and decoded', { skip: missing || false }, async () => {
  const space = await env.mux.video.spaces.create();
  const pub = await join(env.browser.context, env.site.url, env.wsBase, await sign(space.id, { participant_id: 'h264-pub' }));
  await pub.page.evaluate(() => { window.forceH264 = true; });
  await publish(pub.page, { audio: true, video: { width: 640, height: 480 } });
  const viewer = await join(env.browser.context, env.site.url, env.wsBase, await sign(space.id, { participant_id: 'h264-viewer' }));
  await waitForEvent(viewer.page, ['subscribed', 'h264-pub', 'video'], 20000);
  const s = await waitForStats(viewer.page, (x) => x.video.framesDecoded > 20);
  assert.deepEqual(s.video.codecs, ['video/H264']);
  await Promise.all([pub.page.close(), viewer.page.close()]);
});
