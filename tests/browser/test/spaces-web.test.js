// @mux/spaces-web 1.2.0, unmodified, in headless Chromium, against a real spacegate:
// the scenarios that need no media (join, events, refusals, leave).
'use strict';
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { join, waitForEvent, useSuite } = require('./page');

// Filled by the suite's before hook: env.mux, env.key, env.space, env.browser, env.site,
// env.wsBase.
const env = useSuite('browser tests');
const { missing } = env;

const sign = (params, expiration = '1h', spaceId = env.space.id, k = env.key) =>
  env.mux.jwt.signSpaceId(spaceId, { keyId: k.id, keySecret: k.private_key, expiration, params });

test('two pages join, see each other, and exchange names and custom events', { skip: missing || false }, async () => {
  const a = await join(env.browser.context, env.site.url, env.wsBase, await sign({ participant_id: 'alice' }), { displayName: 'Alice' });
  assert.deepEqual(a.result.ok, true, JSON.stringify(a.result));
  assert.equal(a.result.id, 'alice');
  const b = await join(env.browser.context, env.site.url, env.wsBase, await sign({ participant_id: 'bob' }));
  assert.equal(b.result.ok, true, JSON.stringify(b.result));
  // Bob sees alice from the snapshot, alice sees bob arrive.
  await waitForEvent(b.page, ['joined', 'alice', 'Alice']);
  await waitForEvent(a.page, ['joined', 'bob', null]);

  // Display name: the author's promise resolves, the other page gets the event.
  const renamed = await a.page.evaluate(async () => (await window.me.setDisplayName('Alice 2')).displayName);
  assert.equal(renamed, 'Alice 2');
  await waitForEvent(b.page, ['name', 'alice', 'Alice 2']);

  // Custom event: the author's promise resolves with the server's echo.
  const echo = await b.page.evaluate(async () => {
    const e = await window.me.publishCustomEvent('hello from bob');
    return { payload: e.payload, seq: e.sequence_num ?? e.sequenceNumber };
  });
  assert.equal(echo.payload, 'hello from bob');
  assert.ok(echo.seq >= 1);
  await waitForEvent(a.page, ['custom', 'bob', 'hello from bob']);

  // Leave: the other page gets ParticipantLeft, and the id can join again.
  await b.page.evaluate(() => window.space.leave());
  await waitForEvent(a.page, ['left', 'bob']);
  let again;
  for (let i = 0; i < 50; i += 1) {
    again = await join(env.browser.context, env.site.url, env.wsBase, await sign({ participant_id: 'bob', n: i }));
    if (again.result.ok) break;
    await again.page.close();
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.equal(again.result.ok, true, 'bob can join again after leaving');
  await Promise.all([a.page.close(), b.page.close(), again.page.close()]);
});

test('a duplicate participant_id is rejected with JWTError and the first stays', { skip: missing || false }, async () => {
  const first = await join(env.browser.context, env.site.url, env.wsBase, await sign({ participant_id: 'carol' }));
  assert.equal(first.result.ok, true);
  const second = await join(env.browser.context, env.site.url, env.wsBase, await sign({ participant_id: 'carol' }));
  assert.equal(second.result.ok, false);
  assert.equal(second.result.jwt, true, JSON.stringify(second.result));
  assert.match(second.result.message, /already connected/);
  // The first is still in the space: a newcomer sees it.
  const watcher = await join(env.browser.context, env.site.url, env.wsBase, await sign({ participant_id: 'watcher' }));
  await waitForEvent(watcher.page, ['joined', 'carol', null]);
  await Promise.all([first.page.close(), second.page.close(), watcher.page.close()]);
});

test('expired tokens and deleted keys are JWTErrors, with no retry storm', { skip: missing || false }, async () => {
  const expired = await join(env.browser.context, env.site.url, env.wsBase, await sign({}, Math.floor(Date.now() / 1000) - 3600));
  assert.equal(expired.result.ok, false);
  assert.equal(expired.result.jwt, true, JSON.stringify(expired.result));
  assert.match(expired.result.message, /expired/);

  const doomed = await env.mux.system.signingKeys.create();
  const token = await sign({}, '1h', env.space.id, doomed);
  await env.mux.system.signingKeys.delete(doomed.id);
  const deleted = await join(env.browser.context, env.site.url, env.wsBase, token);
  assert.equal(deleted.result.ok, false);
  assert.equal(deleted.result.jwt, true);
  assert.match(deleted.result.message, /unknown or deleted/);

  // Close 4000 stops the SDK: it opened exactly one socket and opens no more.
  await new Promise((r) => setTimeout(r, 1500));
  for (const p of [expired.page, deleted.page]) {
    assert.equal(await p.evaluate(() => window.sockets), 1);
  }
  await Promise.all([expired.page.close(), deleted.page.close()]);
});
