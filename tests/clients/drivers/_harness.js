'use strict';
// What the Node drivers share: run scenarios, print one JSON line each, reach the sandbox.
// The twin of _harness.py, with the same constants; Node 20's own fetch, no dependencies.

const LIMIT = 2;
const SEEDED_LEADS = 3;
// The rotation scenario, as in _harness.py: steps at full pace, the token dropped twice.
const ROTATION_STEPS = 24;
const ROTATION_DROPS = [8, 20];
const UNKNOWN = 'nope';
const UNKNOWN_MESSAGE = 'no account named';
const DUMMY = 'dummy-not-a-token';
const CLIENT = {
  client_id: 'dummy-client-id',
  client_secret: 'dummy-client-secret',
  redirect_uri: 'https://example.com/callback',
};

/** The library cannot do this scenario at all; the message says why. */
class Unsupported extends Error {}

/** The broker's and the sandbox's base URLs, from argv. */
function urls() {
  const [broker, sandbox] = process.argv.slice(2).map((url) => url.replace(/\/$/, ''));
  return { broker, sandbox };
}

/** Turn one of the sandbox's knobs (POST /_sandbox/{action}); return its counters. */
async function admin(sandbox, action, body) {
  const init = action === 'stats' ? {} : { method: 'POST', body: JSON.stringify(body ?? {}) };
  const response = await fetch(`${sandbox}/_sandbox/${action}`, init);
  return response.json();
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

/** The error to throw when a call that must fail returned `result` (or `{data}`) instead. */
function failure(result) {
  const body = result?.data !== undefined ? result.data : result;
  return new Error(`no error raised; it returned ${JSON.stringify(body).slice(0, 200)}`);
}

/** Everything a user can read off an error: message, HTTP status, whatever body it carries. */
function shown(error) {
  const carried = error.data ?? error.response ?? null;
  const status = error.apiResponse?.response?.statusCode;
  const parts = [`${error.name}: ${error.message}`];
  if (status !== undefined) parts.push(`(HTTP ${status})`);
  if (carried !== null && carried !== undefined) parts.push(JSON.stringify(carried));
  return parts.join(' ');
}

/** Check a walk saw every seeded lead once; return the detail. */
function sameLeads(leads) {
  check(new Set(leads).size === leads.length, `a lead came twice: ${leads}`);
  check(leads.length >= SEEDED_LEADS, `only ${leads.length} leads: ${leads}`);
  return `${leads.length} leads over 2 pages`;
}

/** Run `steps` in turn ROTATION_STEPS times, amoCRM dropping the token at ROTATION_DROPS. */
async function rotations(sandbox, ...steps) {
  for (let number = 0; number < ROTATION_STEPS; number += 1) {
    if (ROTATION_DROPS.includes(number)) await admin(sandbox, 'expire');
    await steps[number % steps.length]();
  }
  return `${ROTATION_STEPS} steps at full pace, the token dropped ${ROTATION_DROPS.length} times`;
}

/** Run each scenario in order and report it; one failing does not stop the others. */
async function run(scenarios) {
  for (const [scenario, call] of scenarios) {
    let line;
    try {
      line = { scenario, ok: true, detail: await call() };
    } catch (error) {
      const detail = error instanceof Unsupported
        ? `unsupported: ${error.message}`
        : shown(error).slice(0, 600);
      line = { scenario, ok: false, detail };
    }
    process.stdout.write(`${JSON.stringify(line)}\n`);
  }
}

module.exports = {
  CLIENT, DUMMY, LIMIT, UNKNOWN, UNKNOWN_MESSAGE,
  Unsupported, admin, check, failure, rotations, run, sameLeads, shown, urls,
};
