// @mux/mux-node 7.3.5: the class-style client (Video.Spaces.*, Video.SigningKeys.* on
// /video/v1/signing-keys) and its synchronous Mux.JWT.signSpaceId (kid in the header).
'use strict';
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const Mux = require('mux-node-7');
const { startServer, rejection } = require('./harness');

let server;
let Video;
before(async () => {
  server = await startServer();
  ({ Video } = new Mux(server.tokenId, server.tokenSecret, { baseUrl: server.url }));
});
after(() => server && server.stop());

test('spaces: create, get, list, delete', async () => {
  const space = await Video.Spaces.create({ passthrough: 'it' });
  assert.equal(space.type, 'server');
  assert.equal(space.status, 'idle');
  assert.equal(space.passthrough, 'it');
  assert.match(space.created_at, /^\d+$/);
  assert.deepEqual(await Video.Spaces.get(space.id), space);
  const plain = await Video.Spaces.create();
  const list = await Video.Spaces.list({ limit: 1, page: 2 });
  assert.deepEqual(list.map((s) => s.id), [plain.id]);
  assert.deepEqual(await Video.Spaces.list({ limit: 10, page: 5 }), []);
  assert.equal(await Video.Spaces.delete(space.id), '');
  const gone = await rejection(() => Video.Spaces.get(space.id));
  assert.equal(gone.type, 'not_found');
  assert.ok(gone.messages.length > 0);
});

test('signing keys: create, get, list, delete on the old path', async () => {
  const key = await Video.SigningKeys.create();
  assert.ok(key.id);
  const pem = Buffer.from(key.private_key, 'base64').toString('utf8');
  assert.match(pem, /^-----BEGIN RSA PRIVATE KEY-----/);
  const got = await Video.SigningKeys.get(key.id);
  assert.deepEqual(got, { id: key.id, created_at: key.created_at });
  const list = await Video.SigningKeys.list();
  assert.ok(list.some((k) => k.id === key.id && !('private_key' in k)));
  await Video.SigningKeys.del(key.id);
  const gone = await rejection(() => Video.SigningKeys.get(key.id));
  assert.equal(gone.type, 'not_found');
});

test('Mux.JWT.signSpaceId tokens verify against the stored public key', async () => {
  const key = await Video.SigningKeys.create();
  const space = await Video.Spaces.create();
  const jwt = Mux.JWT.signSpaceId(space.id, {
    keyId: key.id,
    keySecret: key.private_key,
    expiration: '1h',
    params: { role: 'subscriber', participant_id: 'alice' },
  });
  const header = JSON.parse(Buffer.from(jwt.split('.')[0], 'base64url').toString());
  assert.equal(header.kid, key.id, 'mux-node 7 puts kid in the header');
  const claims = server.verify(jwt);
  assert.equal(claims.space_id, space.id);
  assert.equal(claims.key_id, key.id);
  assert.equal(claims.role, 'subscriber');
  assert.equal(claims.participant_id, 'alice');
  // Deleting the key stops its tokens.
  await Video.SigningKeys.del(key.id);
  assert.throws(() => server.verify(jwt), /unknown or deleted/);
});

test('errors surface as Mux error objects', async () => {
  const tooLong = await rejection(() => Video.Spaces.create({ passthrough: 'x'.repeat(256) }));
  assert.equal(tooLong.type, 'invalid_parameters');
  assert.match(tooLong.messages[0], /passthrough/);
  const badType = await rejection(() => Video.Spaces.create({ type: 'p2p' }));
  assert.equal(badType.type, 'invalid_parameters');

  const { Video: Wrong } = new Mux(server.tokenId, 'wrong-secret', { baseUrl: server.url });
  const unauthorized = await rejection(() => Wrong.Spaces.list());
  assert.equal(unauthorized.type, 'unauthorized');

  const ro = server.token('read');
  const { Video: ReadOnly } = new Mux(ro.id, ro.secret, { baseUrl: server.url });
  assert.ok(Array.isArray(await ReadOnly.Spaces.list()));
  const forbidden = await rejection(() => ReadOnly.Spaces.create());
  assert.equal(forbidden.type, 'forbidden');

  const other = server.token('read,write', 'staging');
  const { Video: Staging } = new Mux(other.id, other.secret, { baseUrl: server.url });
  const mine = await Video.Spaces.create();
  const hidden = await rejection(() => Staging.Spaces.get(mine.id));
  assert.equal(hidden.type, 'not_found');

  const bc = await rejection(() => Video.Spaces.Broadcasts.create(mine.id, { live_stream_id: 'LS' }));
  assert.equal(bc.type, 'not_implemented');
});
