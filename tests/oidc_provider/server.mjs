// Test-only OpenID Connect provider (panva's oidc-provider, unmodified from the npm registry).
//
//   node server.mjs PORT REDIRECT_URI
//
// One confidential client (OIDC_CLIENT_ID, default "ecgbridge-console"; secret OIDC_CLIENT_SECRET)
// allowed to redirect to REDIRECT_URI, PKCE required. Sign-in uses the provider's own development
// interaction pages (a login form taking any known account name with any password, then a consent
// form). The accounts below carry a `groups` claim (scope "groups"), put in the ID token.
// The issuer is http://127.0.0.1:PORT; a fresh RS256 key is made at each start. The process exits
// when its standard input closes, so a test that dies does not leave it running.
import { generateKeyPairSync, randomBytes } from 'node:crypto';

import Provider from 'oidc-provider';

const [portArg, redirectUri] = process.argv.slice(2);
const port = Number.parseInt(portArg ?? '', 10);
if (!Number.isInteger(port) || port <= 0 || !redirectUri) {
  console.error('usage: node server.mjs PORT REDIRECT_URI');
  process.exit(2);
}
const clientSecret = process.env.OIDC_CLIENT_SECRET;
if (!clientSecret) {
  console.error('oidc-provider: set OIDC_CLIENT_SECRET');
  process.exit(2);
}

// account id -> claims; the password typed on the login page is not checked (test provider)
const ACCOUNTS = {
  alice: { name: 'Alice Admin', email: 'alice@example.org', groups: ['ecg-admins', 'staff'] },
  oscar: { name: 'Oscar Operator', email: 'oscar@example.org', groups: ['ecg-operators'] },
  victor: { name: 'Victor Viewer', email: 'victor@example.org', groups: ['ecg-viewers'] },
  carol: { name: 'Carol Cafeteria', email: 'carol@example.org', groups: ['cafeteria'] },
};

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'test-rs256', use: 'sig', alg: 'RS256' };

const issuer = `http://127.0.0.1:${port}`;
const provider = new Provider(issuer, {
  clients: [
    {
      client_id: process.env.OIDC_CLIENT_ID || 'ecgbridge-console',
      client_secret: clientSecret,
      redirect_uris: [redirectUri],
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
    },
  ],
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    email: ['email'],
    groups: ['groups'],
  },
  // the scope claims go into the ID token too (the console reads the groups from it)
  conformIdTokenClaims: false,
  pkce: { required: () => true },
  features: { devInteractions: { enabled: true } },
  async findAccount(_ctx, id) {
    const claims = ACCOUNTS[id];
    if (!claims) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, preferred_username: id, ...claims };
      },
    };
  },
});
provider.on('server_error', (_ctx, err) => console.error('oidc-provider: server error:', err));

const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider: listening on ${issuer}`);
});

const stop = () => server.close(() => process.exit(0));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
process.stdin.on('end', () => process.exit(0));
process.stdin.on('error', () => process.exit(0));
process.stdin.resume();
