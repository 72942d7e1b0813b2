// A real OpenID provider for the route OIDC journeys: `oidc-provider` from
// npm (a certified OpenID Connect implementation) over HTTPS on loopback,
// with its development login form (any login and password sign in; the
// login becomes `sub` and `email`).
//
// usage: node oidc_provider.mjs CONFIG.json
//
// CONFIG.json: {
//   "tls_cert": PEM path, "tls_key": PEM path,
//   "client_id": "...", "client_secret": "...", "redirect_uris": ["..."],
//   "id_token_ttl": seconds
// }
//
// Prints "READY <port>" once it listens. Besides the provider's own routes it
// answers GET /_test/grants with how many tokens each grant type issued, so a
// test can tell that a refresh happened at the provider, and under
// "<grant type>_refused" how many token requests of that type it refused, so
// a test can tell how often the provider was asked in vain.
import crypto from 'node:crypto';
import fs from 'node:fs';
import https from 'node:https';

import Provider from 'oidc-provider';

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const grants = {};

const server = https.createServer({
  cert: fs.readFileSync(config.tls_cert),
  key: fs.readFileSync(config.tls_key),
});

server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const signing = { ...privateKey.export({ format: 'jwk' }), kid: crypto.randomUUID(), alg: 'RS256', use: 'sig' };

  const provider = new Provider(`https://127.0.0.1:${port}`, {
    clients: [{
      client_id: config.client_id,
      client_secret: config.client_secret,
      redirect_uris: config.redirect_uris,
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
    }],
    jwks: { keys: [signing] },
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'groups'],
    },
    // Put the scope's claims in the ID token (the route reads them there).
    conformIdTokenClaims: false,
    async findAccount(_ctx, sub) {
      return {
        accountId: sub,
        async claims() {
          return { sub, email: sub, email_verified: true, name: sub.split('@')[0], groups: ['dev', 'ops'] };
        },
      };
    },
    // Give a refresh token whenever the client may use one (many providers
    // do without offline_access).
    async issueRefreshToken(_ctx, client) {
      return client.grantTypeAllowed('refresh_token');
    },
    ttl: {
      IdToken: config.id_token_ttl,
      AccessToken: config.id_token_ttl,
      AuthorizationCode: 60,
      RefreshToken: 3600,
      Interaction: 600,
      Session: 3600,
      Grant: 3600,
    },
    features: { devInteractions: { enabled: true } },
  });
  provider.on('grant.success', (ctx) => {
    const type = ctx.oidc.params.grant_type;
    grants[type] = (grants[type] || 0) + 1;
  });
  provider.on('grant.error', (ctx) => {
    const key = `${ctx.oidc?.params?.grant_type ?? 'unknown'}_refused`;
    grants[key] = (grants[key] || 0) + 1;
  });
  provider.on('server_error', (_ctx, err) => console.error('provider error:', err));

  const handle = provider.callback();
  server.on('request', (req, res) => {
    if (req.method === 'GET' && req.url === '/_test/grants') {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(grants));
      return;
    }
    handle(req, res);
  });
  console.log(`READY ${port}`);
});
