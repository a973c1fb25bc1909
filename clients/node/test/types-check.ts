// Compiled with `tsc --noEmit --strict` by tests/integration/test_clients.py: index.d.ts describes
// the package as a TypeScript backend uses it (never run).
import { ClientError, ForbiddenError, KeydClient, KeyUnavailableError, RestResponse, UnavailableError } from 'keyd-client';

async function backend(headers: Record<string, string | string[] | undefined>, raw: Buffer): Promise<number> {
  const keyd = new KeydClient({ socketPath: '/run/keyd/keyd.sock', timeout: 2000 });
  try {
    const token: string = await keyd.userToken('alice', { ttl: 3600 });
    const doc = await keyd.token({ user_id: 'alice' });
    const expires: number = doc.expires_at;
    const sig: string = await keyd.signature('alice', { uppercase: true });
    const valid: boolean = await keyd.verifyWebhook(headers, raw);
    const answer: RestResponse = await keyd.rest('PUT', '/users/alice', { json: { name: 'Alice' } });
    const retry: string | null = answer.retryAfter;
    const { status } = await keyd.health();
    return token.length + expires + sig.length + (valid ? 1 : 0) + answer.status + (retry ? 1 : 0) + status;
  } catch (e) {
    if (e instanceof ForbiddenError || e instanceof KeyUnavailableError) return e.status;
    const unavailable: ClientError = new UnavailableError(503, 'x', 'y');
    return unavailable.code.length;
  } finally {
    keyd.close();
  }
}

// @ts-expect-error: rest() takes TalkJS's methods only
void new KeydClient().rest('HEAD', '/users/alice');
void backend;
