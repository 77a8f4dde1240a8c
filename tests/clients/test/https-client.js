// Child of https.test.js: one mux-node version against SPACEGATE_URL (https), trusting the
// server's certificate through NODE_EXTRA_CA_CERTS. Prints one JSON object.
'use strict';

async function eight(url) {
  const Mux = require('mux-node-8');
  const mux = new Mux({
    tokenId: process.env.MUX_TOKEN_ID, tokenSecret: process.env.MUX_TOKEN_SECRET, baseURL: url,
    maxRetries: 0,
  });
  const created = await mux.video.spaces.create({ passthrough: 'tls' });
  const retrieved = await mux.video.spaces.retrieve(created.id);
  const listed = [];
  for await (const s of mux.video.spaces.list({ limit: 100 })) listed.push(s.id);
  const key = await mux.system.signingKeys.create();
  const jwt = await mux.jwt.signSpaceId(created.id, { keyId: key.id, keySecret: key.private_key });
  const doomed = await mux.video.spaces.create();
  await mux.video.spaces.delete(doomed.id);
  return { created, retrieved, listed, key: { id: key.id, hasPrivateKey: !!key.private_key }, jwt, deleted: true };
}

async function seven(url) {
  const Mux = require('mux-node-7');
  const { Video } = new Mux(process.env.MUX_TOKEN_ID, process.env.MUX_TOKEN_SECRET, { baseUrl: url });
  const created = await Video.Spaces.create({ passthrough: 'tls' });
  const retrieved = await Video.Spaces.get(created.id);
  const listed = (await Video.Spaces.list({ limit: 100 })).map((s) => s.id);
  const key = await Video.SigningKeys.create();
  const jwt = Mux.JWT.signSpaceId(created.id, { keyId: key.id, keySecret: key.private_key });
  const doomed = await Video.Spaces.create();
  await Video.Spaces.delete(doomed.id);
  return { created, retrieved, listed, key: { id: key.id, hasPrivateKey: !!key.private_key }, jwt, deleted: true };
}

const run = process.argv[2] === '7' ? seven : eight;
run(process.env.SPACEGATE_URL).then(
  (r) => process.stdout.write(JSON.stringify(r)),
  (e) => {
    process.stderr.write(`${e && e.stack ? e.stack : e}\n`);
    process.exit(1);
  },
);
