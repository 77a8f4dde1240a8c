// Simulcast with the real SDK: the server's `joined.simulcast` makes Chrome send two layers,
// the SFU accepts both and forwards one per subscriber.
'use strict';
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { join, waitForEvent, publish, waitForStats, useSuite } = require('./page');

const env = useSuite('browser simulcast tests', {
  config: `
[[simulcast.camera]]
rid = "l"
max_bitrate = 150000
scale_resolution_down_by = 4
max_framerate = 15

[[simulcast.camera]]
rid = "h"
max_bitrate = 1200000
scale_resolution_down_by = 1
max_framerate = 30
`,
});
const { missing } = env;

const sign = (params) => env.mux.jwt.signSpaceId(env.space.id,
  { keyId: env.key.id, keySecret: env.key.private_key, expiration: '1h', params });

test('the SDK publishes the configured layers and the subscriber gets one of them', { skip: missing || false }, async () => {
  const pub = await join(env.browser.context, env.site.url, env.wsBase, await sign({ participant_id: 'sc-pub' }));
  assert.equal(pub.result.ok, true, JSON.stringify(pub.result));
  await publish(pub.page, { audio: false, video: { width: 1280, height: 720 } });
  const viewer = await join(env.browser.context, env.site.url, env.wsBase, await sign({ participant_id: 'sc-viewer' }));
  await waitForEvent(viewer.page, ['subscribed', 'sc-pub', 'video'], 20000);
  const s = await waitForStats(viewer.page, (x) => x.video.framesDecoded > 30);
  // One inbound video stream, whatever the number of layers sent: the highest layer
  // (full 1280 width; the low one is a quarter of it).
  assert.equal(s.video.streams, 1);
  await waitForStats(viewer.page, (x) => x.video.frameWidth === 1280);
  // The publisher really sends both layers (rids as configured).
  const rids = await pub.page.evaluate(async () => {
    const out = new Set();
    for (const pc of window.pcs) {
      (await pc.getStats()).forEach((r) => {
        if (r.type === 'outbound-rtp' && r.kind === 'video' && r.rid && r.packetsSent > 0) out.add(r.rid);
      });
    }
    return [...out].sort();
  });
  assert.deepEqual(rids, ['h', 'l']);
  await Promise.all([pub.page.close(), viewer.page.close()]);
});
