// Drives a route OIDC login in a real headless browser: Debian's chromium,
// through playwright-core. Opens the app, signs in on the provider's
// development login form, confirms the consent page and prints what the app
// answered once the browser is back, with the browser's cookies for the app.
//
// usage: node browser_login.mjs CONFIG.json
//
// CONFIG.json: {
//   "chromium": "/usr/bin/chromium", "url": "http://sso.test:PORT/headers",
//   "map_hosts": ["sso.test"], "login": "erin@example.com"
// }
//
// Prints one JSON line: {"url", "body", "cookies"}. The test provider's
// certificate is from a test CA the browser does not know, so certificate
// errors are ignored in this browser only; the coordinator checks the
// provider's certificate against --oidc-ca-file.
import fs from 'node:fs';

import { chromium } from 'playwright-core';

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const rules = config.map_hosts.map((h) => `MAP ${h} 127.0.0.1`).join(',');

const browser = await chromium.launch({
  executablePath: config.chromium,
  headless: true,
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    `--host-resolver-rules=${rules}`,
  ],
});
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  await page.goto(config.url);
  await page.fill('input[name="login"]', config.login);
  await page.fill('input[name="password"]', 'any password');
  await Promise.all([page.waitForLoadState('load'), page.click('button[type="submit"]')]);
  // The consent page, when the provider shows one.
  const target = new URL(config.url);
  if (new URL(page.url()).host !== target.host) {
    await page.click('button[type="submit"]');
  }
  await page.waitForURL((u) => u.host === target.host && u.pathname === target.pathname);
  const body = await page.evaluate(() => document.body.innerText);
  const cookies = await context.cookies(config.url);
  console.log(JSON.stringify({ url: page.url(), body, cookies }));
} finally {
  await browser.close();
}
