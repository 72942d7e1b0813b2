// A standard OAuth client (openid-client), not our code: discovers miren's
// issuer, then trades a CI token at its token endpoint (RFC 8693).
//
//   node token_exchange.mjs ISSUER SUBJECT_TOKEN SCOPE [AUDIENCE]
//   (NODE_EXTRA_CA_CERTS=<cluster CA> so Node trusts the coordinator)
//
// Prints {"discovered": {...}, "response": {...}} or {"error", "error_description"}.
import * as client from 'openid-client';

const [issuer, subjectToken, scope, audience] = process.argv.slice(2);
const out = {};
try {
  const config = await client.discovery(new URL(issuer), 'ci-pipeline', undefined, client.None());
  const meta = config.serverMetadata();
  out.discovered = {
    token_endpoint: meta.token_endpoint,
    grant_types_supported: meta.grant_types_supported,
    token_endpoint_auth_methods_supported: meta.token_endpoint_auth_methods_supported,
  };
  const params = {
    subject_token: subjectToken,
    subject_token_type: 'urn:ietf:params:oauth:token-type:id_token',
    scope,
  };
  if (audience) params.audience = audience;
  const r = await client.genericGrantRequest(config, 'urn:ietf:params:oauth:grant-type:token-exchange', params);
  out.response = {
    access_token: r.access_token,
    token_type: r.token_type,
    expires_in: r.expires_in,
    scope: r.scope,
    issued_token_type: r.issued_token_type,
  };
  console.log(JSON.stringify(out));
} catch (e) {
  out.error = e.error ?? e.code ?? e.name;
  out.error_description = e.error_description ?? e.message;
  console.log(JSON.stringify(out));
  process.exitCode = 1;
}
