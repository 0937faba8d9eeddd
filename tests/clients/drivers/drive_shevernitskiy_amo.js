'use strict';
// Drive @shevernitskiy/amo 0.1.12 through the broker.
//
// `new Amo(domain, auth)` calls `https://{domain}` with no option for another scheme or
// port; the client's RestClient is public as `amo.rest`, and the patch sets its `url_base`
// to the broker (or the broker's /a/NAME). Its auth is an OAuth token whose `expires_at`
// lies a year ahead, so it never refreshes; token_refresh gives it `expires_at: 0`, and it
// refreshes at `{url_base}/oauth2/access_token` before its first call.
// It pages by number only (`getLeads({page})`): nothing follows a `_links` href.

const {
  CLIENT, DUMMY, LIMIT, UNKNOWN, UNKNOWN_MESSAGE, Unsupported,
  admin, check, failure, rotations, run, sameLeads, shown, urls,
} = require('./_harness');
const { Amo } = require('@shevernitskiy/amo');

const { broker, sandbox } = urls();
const YEAR = 365 * 86400 * 1000;

function client(base = broker, expiresAt = Date.now() + YEAR) {
  const token = { token_type: 'Bearer', expires_in: 86400, expires_at: expiresAt };
  const amo = new Amo('unused.amocrm.ru', {
    ...CLIENT, ...token, access_token: DUMMY, refresh_token: DUMMY,
  });
  amo.rest.url_base = base; // the patch: no option sets it
  return amo;
}

async function main() {
  const amo = client();
  const made = [];

  const account = async (on = amo) => {
    const got = await on.account.getAccount({ with: ['users_groups', 'task_types'] });
    return `account ${got.id} ${got.name}`;
  };
  const update = async () => {
    await amo.lead.updateLeadById(made[0], { price: 250 });
    const lead = await amo.lead.getLeadById(made[0]);
    check(lead.price === 250, `price is ${lead.price}`);
    return `updated ${lead.id}`;
  };
  const page = async (number) => {
    const answer = await amo.lead.getLeads({ page: number, limit: LIMIT });
    return answer._embedded.leads.map((lead) => lead.id);
  };
  const unsupported = async () => {
    throw new Unsupported('pages by number only (getLeads({page})); nothing follows _links');
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
    ['pages', async () => sameLeads([...await page(1), ...await page(2)])],
    ['next_href', unsupported],
    ['next_href_account', unsupported],
    ['get_lead', async () => {
      const lead = await amo.lead.getLeadById(1000001);
      return `lead ${lead.id} ${lead.name}`;
    }],
    ['create_lead', async () => {
      const answer = await amo.lead.addLeads([{ name: '@shevernitskiy/amo', price: 100 }]);
      made.push(answer._embedded.leads[0].id);
      return `created ${made[0]}`;
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
        return await expectFailure(() => account(), (text) => text.includes('403'));
      } finally {
        await admin(sandbox, 'unblock');
      }
    }],
    ['unknown_account', () => expectFailure(
      () => account(client(`${broker}/a/${UNKNOWN}`)),
      (text) => text.includes(UNKNOWN_MESSAGE),
    )],
    ['token_refresh', async () => {
      const refreshing = client(broker, 0);
      const detail = await account(refreshing);
      check(refreshing.rest.token.access_token !== DUMMY, 'it kept the old token');
      return `refreshed, then ${detail}`;
    }],
  ]);
}

main();
