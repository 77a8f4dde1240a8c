// @mux/spaces-web 1.2.0 in Chromium joining over wss:// (spacegate with --tls-cert and
// --tls-key, a self-signed P-256 certificate the browser is told to accept), and media
// flowing as before: TLS carries the signaling, media stays on UDP.
'use strict';
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { join, waitForEvent, publish, waitForStats, useSuite } = require('./page');

const env = useSuite('browser tests over TLS', { tls: 'ec' });
const { missing } = env;

const sign = (params) => env.mux.jwt.signSpaceId(env.space.id, {
  keyId: env.key.id, keySecret: env.key.private_key, expiration: '1h', params,
});

test('two pages join over wss://, see each other, and get each other\'s media', { skip: missing || false }, async () => {
  assert.match(env.wsBase, /^wss:\/\//);
  const a = await join(env.browser.context, env.site.url, env.wsBase, await sign({ participant_id: 'alice' }));
  assert.equal(a.result.ok, true, JSON.stringify(a.result));
  const b = await join(env.browser.context, env.site.url, env.wsBase, await sign({ participant_id: 'bob' }));
  assert.equal(b.result.ok, true, JSON.stringify(b.result));
  await waitForEvent(b.page, ['joined', 'alice', null]);
  await waitForEvent(a.page, ['joined', 'bob', null]);
  await publish(a.page, { audio: false, video: true });
  await waitForStats(b.page, (s) => s.video.framesDecoded > 5);
  await Promise.all([a.page.close(), b.page.close()]);
});
