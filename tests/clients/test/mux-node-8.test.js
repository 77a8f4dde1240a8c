// @mux/mux-node 8.8.0: the Stainless client (mux.video.spaces.*, mux.system.signingKeys.*
// on /system/v1/signing-keys), auto-pagination, typed errors, and mux.jwt.signSpaceId
// (kid in the payload).
'use strict';
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const Mux = require('mux-node-8');
const { startServer, rejection } = require('./harness');

let server;
let mux;
before(async () => {
  server = await startServer();
  mux = new Mux({ tokenId: server.tokenId, tokenSecret: server.tokenSecret, baseURL: server.url });
});
after(() => server && server.stop());

test('spaces: create, retrieve, delete', async () => {
  const space = await mux.video.spaces.create({ passthrough: 'eight' });
  assert.equal(space.status, 'idle');
  assert.equal(space.passthrough, 'eight');
  assert.deepEqual(space.broadcasts, []);
  assert.deepEqual(await mux.video.spaces.retrieve(space.id), space);
  assert.equal(await mux.video.spaces.delete(space.id), null);
  const gone = await rejection(() => mux.video.spaces.retrieve(space.id));
  assert.ok(gone instanceof Mux.NotFoundError);
  assert.equal(gone.status, 404);
  assert.equal(gone.error.error.type, 'not_found');
});

test('auto-pagination walks every page and stops at the first empty one', async () => {
  const created = [];
  for (let i = 0; i < 7; i++) created.push((await mux.video.spaces.create({ passthrough: `p${i}` })).id);
  const seen = [];
  for await (const s of mux.video.spaces.list({ limit: 3 })) seen.push(s.id);
  for (const id of created) assert.ok(seen.includes(id), `missing ${id}`);
  assert.equal(new Set(seen).size, seen.length, 'no space listed twice');
  const page = await mux.video.spaces.list({ limit: 3, page: 1 });
  assert.equal(page.data.length, 3);
});

test('signing keys on the system path', async () => {
  const key = await mux.system.signingKeys.create();
  assert.ok(key.private_key);
  const got = await mux.system.signingKeys.retrieve(key.id);
  assert.deepEqual(got, { id: key.id, created_at: key.created_at });
  const ids = [];
  for await (const k of mux.system.signingKeys.list({ limit: 1 })) ids.push(k.id);
  assert.ok(ids.includes(key.id));
  await mux.system.signingKeys.delete(key.id);
  const gone = await rejection(() => mux.system.signingKeys.retrieve(key.id));
  assert.ok(gone instanceof Mux.NotFoundError);
});

test('mux.jwt.signSpaceId tokens verify against the stored public key', async () => {
  const key = await mux.system.signingKeys.create();
  const space = await mux.video.spaces.create();
  const jwt = await mux.jwt.signSpaceId(space.id, {
    keyId: key.id,
    keySecret: key.private_key,
    expiration: '1h',
    params: { role: 'subscriber' },
  });
  const payload = JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString());
  assert.equal(payload.kid, key.id, 'mux-node 8 puts kid in the payload');
  const claims = server.verify(jwt);
  assert.equal(claims.space_id, space.id);
  assert.equal(claims.role, 'subscriber');
  assert.equal(claims.participant_id, null);
  await mux.system.signingKeys.delete(key.id);
  assert.throws(() => server.verify(jwt), /unknown or deleted/);
});

test('errors surface as typed APIError subclasses', async () => {
  const bad = await rejection(() => mux.video.spaces.create({ passthrough: 'x'.repeat(256) }));
  assert.ok(bad instanceof Mux.BadRequestError, String(bad));
  assert.equal(bad.error.error.type, 'invalid_parameters');

  const wrong = new Mux({ tokenId: server.tokenId, tokenSecret: 'nope', baseURL: server.url });
  const unauth = await rejection(() => wrong.video.spaces.list());
  assert.ok(unauth instanceof Mux.AuthenticationError, String(unauth));

  const ro = server.token('read');
  const readOnly = new Mux({ tokenId: ro.id, tokenSecret: ro.secret, baseURL: server.url });
  const denied = await rejection(() => readOnly.system.signingKeys.create());
  assert.ok(denied instanceof Mux.PermissionDeniedError, String(denied));

  const space = await mux.video.spaces.create();
  // 501 carries x-should-retry: false, so the client gives up at once instead of retrying:
  // counted in requests made, not in time taken.
  let requests = 0;
  const counted = new Mux({
    tokenId: server.tokenId,
    tokenSecret: server.tokenSecret,
    baseURL: server.url,
    fetch: (...args) => {
      requests += 1;
      return fetch(...args);
    },
  });
  const notYet = await rejection(() => counted.video.spaces.createBroadcast(space.id, { live_stream_id: 'LS' }));
  assert.equal(notYet.status, 501);
  assert.equal(notYet.error.error.type, 'not_implemented');
  assert.equal(requests, 1, 'no retry');
});
