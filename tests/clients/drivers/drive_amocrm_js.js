'use strict';
// Drive amocrm-js 3.6.0 through the broker.
//
// It sends every call with https.request to `{domain}` or `{domain}.amocrm.ru`, port 443,
// with no option for a scheme, a port or a path prefix. The patch below sends the calls
// for one made-up domain to the broker over http instead: `amo-broker.local` is the
// default account, `NAME.a.amo-broker.local` is /a/NAME/. It keeps the path it is given
// (also of a `_links` href, whatever host the href names), so links work through it.
// Its auth is a long-lived token (`auth.bearer`): nothing is ever refreshed.
// token_refresh gives it an expired OAuth token instead, which it refreshes first.

const http = require('http');
const https = require('https');
const {
  CLIENT, DUMMY, LIMIT, UNKNOWN, UNKNOWN_MESSAGE,
  admin, check, failure, rotations, run, sameLeads, shown, urls,
} = require('./_harness');

const { broker, sandbox } = urls();
const target = new URL(broker);
const DOMAIN = 'amo-broker.local';

// The patch: requests for DOMAIN (or NAME.a.DOMAIN) go to the broker over http.
const httpsRequest = https.request;
https.request = function brokered(options, callback) {
  const named = options.hostname.match(/^([a-z0-9-]+)\.a\.amo-broker\.local$/);
  if (options.hostname !== DOMAIN && !named) return httpsRequest.apply(this, arguments);
  const prefix = named && !options.path.startsWith('/a/') ? `/a/${named[1]}` : '';
  const to = { ...options, hostname: target.hostname, port: target.port };
  return http.request({ ...to, path: prefix + options.path }, callback);
};

const { Client } = require('amocrm-js');

function client(domain = DOMAIN, auth = { bearer: DUMMY }) {
  return new Client({ domain, auth: { ...CLIENT, ...auth } });
}

async function main() {
  const amo = client();
  const made = [];

  const account = async (on = amo) => {
    const { data } = await on.request.get('/api/v4/account', { with: 'users_groups,task_types' });
    check(data.id, `no account in ${JSON.stringify(data).slice(0, 200)}`);
    return `account ${data.id} ${data.name}`;
  };
  const update = async () => {
    await amo.leads.update([{ id: made[0], price: 250 }]);
    const lead = await amo.leads.getById(made[0]);
    check(lead.price === 250, `price is ${lead.price}`);
    return `updated ${lead.id}`;
  };
  const ids = (pagination) => pagination.getData().map((lead) => lead.id);
  const follow = async (on) => {
    const pagination = await on.leads.get({ limit: LIMIT });
    const first = ids(pagination);
    check(pagination.hasNext(), 'page 1 has no next link');
    await pagination.next(); // fetches _links.next.href
    return sameLeads([...first, ...ids(pagination)]);
  };
  const expectFailure = async (call, what) => {
    let result;
    try {
      result = await call();
    } catch (error) {
      check(what(shown(error)), `the wrong error: ${shown(error)}`);
      return shown(error).slice(0, 200);
    }
    throw failure(result);
  };

  await run([
    ['account', () => account()],
    ['pages', async () => {
      const first = await amo.leads.get({ page: 1, limit: LIMIT });
      const second = await amo.leads.get({ page: 2, limit: LIMIT });
      return sameLeads([...ids(first), ...ids(second)]);
    }],
    ['next_href', () => follow(amo)],
    ['next_href_account', () => follow(client(`default.a.${DOMAIN}`))],
    ['get_lead', async () => {
      const lead = await amo.leads.getById(1000001);
      return `lead ${lead.id} ${lead.name}`;
    }],
    ['create_lead', async () => {
      const [lead] = await amo.leads.create([{ name: 'amocrm-js', price: 100 }]);
      made.push(lead.id);
      return `created ${lead.id}`;
    }],
    ['update_lead', update],
    ['rotation', () => rotations(sandbox, account, update)],
    ['throttled', async () => {
      await admin(sandbox, 'script', [429]);
      const detail = await account();
      check((await admin(sandbox, 'stats')).api_script.length === 0, 'the 429 was never answered');
      return detail;
    }],
    ['blocked', async () => {
      await admin(sandbox, 'block');
      try {
        // It parses the HTML 403 as JSON and throws JSON_PARSE_ERROR with the response.
        return await expectFailure(() => account(), (text) => text.includes('403'));
      } finally {
        await admin(sandbox, 'unblock');
      }
    }],
    ['unknown_account', () => expectFailure(
      // It throws only for a JSON body with a `status` field (amoCRM's problem+json).
      () => client(`${UNKNOWN}.a.${DOMAIN}`).request.get('/api/v4/account'),
      (text) => text.includes(UNKNOWN_MESSAGE),
    )],
    ['token_refresh', async () => {
      const refreshing = client(DOMAIN, {});
      const expired = { token_type: 'Bearer', access_token: DUMMY, refresh_token: DUMMY };
      refreshing.token.setValue({ ...expired, expires_in: 86400, expires_at: Date.now() - 1000 });
      const detail = await account(refreshing);
      // A failed refresh is silent here: only a new token shows that it worked.
      const now = refreshing.token.getValue();
      check(now.access_token !== DUMMY, 'the refresh failed silently; it kept the old token');
      return `refreshed, then ${detail}`;
    }],
  ]);
}

main();
