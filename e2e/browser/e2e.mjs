// End-to-end test: the real posthog-js, in headless Chromium, against Caddy
// with flagsplit's posthog_flags handler on the reverse-proxy route PostHog
// documents. Everything listens on loopback: a stand-in for PostHog (flag
// definitions, fill-in /flags calls, remote config, events) and an upstream
// that echoes the X-Feature-Flag-* headers it received.
//
// It checks, for 200 distinct ids (half assigned by the proxy's cookie, half
// set with identify), that posthog.getFeatureFlag() in the browser equals the
// header the upstream received for the same user (boolean, multivariate and
// property-targeted flags); that a kill switch set through the admin API
// reaches both on the next load; and that with the {feature_flags.bootstrap}
// placeholder no flags request leaves the browser.
//
// Usage: node e2e.mjs --caddy <binary> [--record <dir>]
// --record writes the flags requests posthog-js sent (every body encoding it
// has) as fixtures for the Go unit tests.

import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, mkdirSync, rmSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import puppeteer from 'puppeteer-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const opt = (name, def) => {
	const i = args.indexOf(name);
	return i >= 0 ? args[i + 1] : def;
};
const caddyBin = opt('--caddy', process.env.CADDY);
const recordDir = opt('--record', process.env.E2E_RECORD);
const users = Number(opt('--users', '200'));
const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';
if (!caddyBin) {
	console.error('usage: node e2e.mjs --caddy <binary> [--record <dir>]');
	process.exit(2);
}

const TOKEN = 'phc_e2e';
const PERSONAL = 'phx_e2e';
const COMPARED = ['e2e-boolean', 'e2e-multivariate', 'e2e-plan'];
const FILLED = 'e2e-continuity';
let passed = 0;
let failed = 0;
const failures = [];
function check(cond, what) {
	if (cond) {
		passed++;
	} else {
		failed++;
		if (failures.length < 20) failures.push(what);
	}
}

// listen starts server on a port the kernel picks and resolves to it.
function listen(server) {
	return new Promise((resolve, reject) => {
		server.once('error', reject);
		server.listen(0, '127.0.0.1', () => resolve(server.address().port));
	});
}

// freePort asks the kernel for a free port for Caddy's listeners.
async function freePort() {
	const s = net.createServer();
	const port = await listen(s);
	await new Promise((r) => s.close(r));
	return port;
}

// adminCall talks to Caddy's admin API with node's http client: fetch sends
// Sec-Fetch-Mode, which the admin API answers as a browser's request from no
// allowed origin.
function adminCall(port, method, urlPath, body) {
	return new Promise((resolve, reject) => {
		const req = http.request({ host: '127.0.0.1', port, method, path: urlPath, headers: body ? { 'Content-Type': 'application/json' } : {} }, (res) => {
			readBody(res).then((b) => resolve({ status: res.statusCode, ok: res.statusCode >= 200 && res.statusCode < 300, text: b.toString('utf8') }));
		});
		req.on('error', reject);
		req.end(body);
	});
}

function readBody(req) {
	return new Promise((resolve) => {
		const chunks = [];
		req.on('data', (c) => chunks.push(c));
		req.on('end', () => resolve(Buffer.concat(chunks)));
	});
}

// The PostHog stand-in.
const definitions = readFileSync(path.join(here, 'flags.json'));
const fills = [];
const posthog = http.createServer(async (req, res) => {
	const body = await readBody(req);
	const url = new URL(req.url, 'http://x');
	const json = (code, obj) => {
		res.writeHead(code, { 'Content-Type': 'application/json' });
		res.end(JSON.stringify(obj));
	};
	if (url.pathname === '/flags/definitions') {
		if (req.headers.authorization !== `Bearer ${PERSONAL}` || url.searchParams.get('token') !== TOKEN) return json(401, { detail: 'bad key' });
		res.writeHead(200, { 'Content-Type': 'application/json', ETag: '"e2e-1"' });
		return res.end(definitions);
	}
	if (url.pathname === '/flags/' || url.pathname === '/flags') {
		// Only the edge's fill-in calls reach here: posthog_flags answers
		// the browser's own.
		const doc = JSON.parse(body.toString('utf8'));
		fills.push(doc);
		const flags = {};
		for (const key of doc.flag_keys || []) {
			if (key === FILLED) {
				flags[key] = { key, enabled: true, variant: null, reason: { code: 'condition_match', condition_index: 0, description: 'Matched condition set 1' }, metadata: { id: 104, version: 1, description: null, payload: null } };
			}
		}
		return json(200, { flags, errorsWhileComputingFlags: false, requestId: '00000000-0000-0000-0000-000000000001' });
	}
	if (url.pathname === `/array/${TOKEN}/config`) {
		return json(200, { token: TOKEN, hasFeatureFlags: true, supportedCompression: ['gzip', 'gzip-js'], sessionRecording: false, surveys: false, heatmaps: false, autocapture_opt_out: true, capturePerformance: false });
	}
	if (url.pathname === `/array/${TOKEN}/config.js`) {
		res.writeHead(404);
		return res.end();
	}
	// Events and everything else posthog-js sends.
	return json(200, { status: 1 });
});

// The site's upstream: it answers with the headers flagsplit gave it.
const upstream = http.createServer((req, res) => {
	const flags = {};
	for (const [name, value] of Object.entries(req.headers)) {
		if (name.startsWith('x-feature-flag-')) flags[name.slice('x-feature-flag-'.length)] = value;
	}
	res.writeHead(200, { 'Content-Type': 'application/json' });
	res.end(JSON.stringify({ distinctId: req.headers['x-posthog-distinct-id'] || null, flags }));
});

const tmp = mkdtempSync(path.join(os.tmpdir(), 'flagsplit-e2e-'));
let caddy;
let browser;

async function main() {
	const phPort = await listen(posthog);
	const appPort = await listen(upstream);
	const httpPort = await freePort();
	const adminPort = await freePort();
	const site = `http://127.0.0.1:${httpPort}`;
	const caddyfile = `{
	admin 127.0.0.1:${adminPort}
	auto_https off
	storage file_system ${path.join(tmp, 'storage')}
	feature_flags {
		posthog {
			host http://127.0.0.1:${phPort}
			project_api_key ${TOKEN}
			personal_api_key ${PERSONAL}
			poll_interval 1h
		}
	}
}

${site} {
	feature_flags {
		person_property plan {http.request.cookie.plan}
	}

	# PostHog's reverse proxy for posthog-js, with the flags answered here.
	handle_path /ingest/* {
		posthog_flags
		reverse_proxy 127.0.0.1:${phPort}
	}

	handle_path /static/* {
		root * ${path.join(here, 'node_modules', 'posthog-js', 'dist')}
		file_server
	}

	handle /app/* {
		reverse_proxy 127.0.0.1:${appPort}
	}

	handle {
		root * ${path.join(here, 'pages')}
		templates
		file_server
	}
}
`;
	writeFileSync(path.join(tmp, 'Caddyfile'), caddyfile);
	const log = [];
	caddy = spawn(caddyBin, ['run', '--config', path.join(tmp, 'Caddyfile'), '--adapter', 'caddyfile'], { stdio: ['ignore', 'pipe', 'pipe'] });
	caddy.stdout.on('data', (d) => log.push(d.toString()));
	caddy.stderr.on('data', (d) => log.push(d.toString()));
	const exited = new Promise((resolve) => caddy.once('exit', (code) => resolve(code)));

	// Ready when the admin API says definitions from PostHog are in force.
	const deadline = Date.now() + 60000;
	for (;;) {
		const state = await Promise.race([
			adminCall(adminPort, 'GET', '/feature_flags/').then((r) => (r.ok ? JSON.parse(r.text) : null)).catch(() => null),
			exited.then((code) => ({ exited: code })),
		]);
		if (state && state.exited !== undefined) throw new Error(`caddy exited (${state.exited}):\n${log.slice(-20).join('')}`);
		if (state && state.source && state.source.kind === 'posthog') break;
		if (Date.now() > deadline) throw new Error(`caddy not ready:\n${log.slice(-20).join('')}`);
		await new Promise((r) => setTimeout(r, 100));
	}

	browser = await puppeteer.launch({
		executablePath: chromiumPath,
		headless: true,
		args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run', '--no-default-browser-check'],
	});

	const recorded = [];
	// visit loads url in a fresh browser context (no cookies, no storage)
	// and returns what the page published, with the flags requests it sent.
	async function visit(url, { record = false, extra } = {}) {
		const ctx = await browser.createBrowserContext();
		try {
			const page = await ctx.newPage();
			const flagsRequests = [];
			page.on('request', (r) => {
				if (r.url().includes('/ingest/flags') || r.url().includes('/ingest/decide')) flagsRequests.push(r.url());
			});
			page.on('pageerror', (e) => log.push(`pageerror: ${e}\n`));
			await page.goto(site + url, { waitUntil: 'load' });
			await page.waitForFunction('window.e2eResult !== null || window.e2eError !== null', { timeout: 20000 });
			const result = await page.evaluate(() => window.e2eResult || { error: window.e2eError });
			if (record) recorded.push({ label: record, entries: await recordEncodings(page) });
			if (extra) await extra(page, result);
			return { result, flagsRequests };
		} finally {
			await ctx.close();
		}
	}

	// recordEncodings sends the page's own flags request again through
	// posthog-js's request layer in each body encoding it has, and returns
	// every request as sent with the answer posthog_flags gave.
	async function recordEncodings(page) {
		return page.evaluate(async () => {
			const st = window.e2eFlags;
			const ph = window.posthog;
			// The body posthog-js sent on load, sent again through its own
			// request layer in each body encoding it has.
			const loaded = st.log.find((e) => e.url.startsWith('/flags'));
			const raw = Uint8Array.from(atob(loaded.body_base64), (c) => c.charCodeAt(0));
			let text;
			if (raw[0] === 0x1f && raw[1] === 0x8b) {
				text = await new Response(new Blob([raw]).stream().pipeThrough(new DecompressionStream('gzip'))).text();
			} else {
				text = new TextDecoder().decode(raw);
				if (text.startsWith('data=')) text = decodeURIComponent(escape(atob(decodeURIComponent(text.slice(5)))));
			}
			const data = JSON.parse(text);
			const send = (urlPath, compression) =>
				new Promise((resolve) =>
					ph._send_request({ url: ph.config.api_host + urlPath, method: 'POST', data, compression, callback: resolve })
				);
			await send('/flags/?v=2', undefined);
			await send('/flags/?v=2', 'base64');
			await send('/flags/?v=2', 'gzip-js');
			await send('/decide/?v=3', 'base64');
			// The log entry lands once the answer's text is read.
			const want = st.log.indexOf(loaded) + 5;
			while (st.log.length < want) await new Promise((r) => setTimeout(r, 10));
			return [loaded, ...st.log.slice(-4)];
		});
	}

	// 1. 200 distinct ids: browser and upstream agree.
	const seen = { 'e2e-boolean': new Set(), 'e2e-multivariate': new Set(), 'e2e-plan': new Set() };
	const fillsBefore = fills.length;
	let flagsRequestsTotal = 0;
	const jobs = [];
	for (let i = 0; i < users; i++) jobs.push(i);
	const worker = async () => {
		while (jobs.length) {
			const i = jobs.shift();
			const plan = i % 3 === 0 ? 'pro' : 'free';
			const identify = i % 2 === 1 ? `user-${i}` : null;
			const url = `/index.html?plan=${plan}` + (identify ? `&identify=${identify}` : '');
			const { result, flagsRequests } = await visit(url, { record: recordDir && i < 2 ? (identify ? 'identified' : 'anonymous') : false });
			flagsRequestsTotal += flagsRequests.length;
			if (result.error) {
				check(false, `user ${i}: page error ${result.error}`);
				continue;
			}
			const up = result.upstream;
			check(up.distinctId === result.distinctId, `user ${i}: upstream id ${up.distinctId} != browser id ${result.distinctId}`);
			if (identify) check(result.distinctId === identify, `user ${i}: browser id ${result.distinctId} != ${identify}`);
			for (const key of COMPARED) {
				const b = result.browser[key];
				check(b !== null && String(b) === up.flags[key], `user ${i} (${plan}, ${identify ? 'identify' : 'cookie'}): ${key} browser=${JSON.stringify(b)} upstream=${up.flags[key]}`);
				seen[key].add(String(b));
			}
			if (result.browser['e2e-multivariate'] === 'test') {
				check(result.payload && result.payload.headline === '<b>New</b> & improved', `user ${i}: payload ${JSON.stringify(result.payload)}`);
			}
			// The flag only PostHog can decide: the edge filled it in.
			check(result.browser[FILLED] === true, `user ${i}: ${FILLED} browser=${result.browser[FILLED]} (want PostHog's true)`);
			check(up.flags[FILLED] === 'false', `user ${i}: ${FILLED} upstream=${up.flags[FILLED]} (the proxy routes it as false)`);
		}
	};
	await Promise.all([worker(), worker(), worker()]);
	check(seen['e2e-boolean'].size === 2, `boolean values seen: ${[...seen['e2e-boolean']]}`);
	check(seen['e2e-multivariate'].size === 3, `variants seen: ${[...seen['e2e-multivariate']]}`);
	check(seen['e2e-plan'].has('true') && seen['e2e-plan'].has('false'), `plan values seen: ${[...seen['e2e-plan']]}`);
	const userFills = fills.slice(fillsBefore);
	check(userFills.length > 0 && userFills.every((f) => JSON.stringify(f.flag_keys) === JSON.stringify([FILLED])), `fill-in calls asked only for ${FILLED}: ${userFills.length} calls`);
	console.log(`users: ${users}, flags requests from the browsers: ${flagsRequestsTotal}, fill-in calls to PostHog: ${userFills.length}`);

	// 2. A kill switch through the admin API reaches both on the next load.
	const put = await adminCall(adminPort, 'PUT', '/feature_flags/overrides/e2e-multivariate', JSON.stringify({ killed: true }));
	check(put.ok, `PUT override: ${put.status}`);
	for (let i = 0; i < 5; i++) {
		const { result } = await visit(`/index.html?plan=pro&identify=killed-${i}`);
		check(result.browser && result.browser['e2e-multivariate'] === false, `killed: browser ${JSON.stringify(result.browser && result.browser['e2e-multivariate'])}`);
		check(result.upstream && result.upstream.flags['e2e-multivariate'] === 'false', `killed: upstream ${result.upstream && result.upstream.flags['e2e-multivariate']}`);
	}
	const del = await adminCall(adminPort, 'DELETE', '/feature_flags/overrides/e2e-multivariate');
	check(del.ok, `DELETE override: ${del.status}`);

	// 3. Bootstrap: the page starts with the edge's answers; no flags request.
	for (let i = 0; i < 10; i++) {
		const { result, flagsRequests } = await visit('/bootstrap.html', {
			extra: async (page) => {
				// Any flags request would start right after init; wait for
				// the network to settle before counting.
				await page.waitForNetworkIdle({ idleTime: 300, timeout: 10000 });
			},
		});
		check(flagsRequests.length === 0, `bootstrap: flags requests left the browser: ${flagsRequests}`);
		check(result.upstream && result.distinctId === result.upstream.distinctId, `bootstrap: ids ${result.distinctId} / ${result.upstream && result.upstream.distinctId}`);
		for (const key of [...COMPARED, FILLED]) {
			const b = result.browser && result.browser[key];
			check(b !== undefined && b !== null && String(b) === result.upstream.flags[key], `bootstrap: ${key} browser=${JSON.stringify(b)} upstream=${result.upstream && result.upstream.flags[key]}`);
		}
	}

	// 4. The endpoint's metrics.
	const metrics = (await adminCall(adminPort, 'GET', '/metrics')).text;
	const served = metrics.split('\n').filter((l) => l.startsWith('caddy_feature_flags_posthog_flags_'));
	check(served.some((l) => l.includes('answer="filled"')), 'metrics: posthog_flags_requests_total{answer="filled"}');
	console.log(served.join('\n'));

	if (recordDir) {
		mkdirSync(recordDir, { recursive: true });
		const names = ['flags_v2_onload', 'flags_v2_json', 'flags_v2_base64', 'flags_v2_gzip', 'decide_v3_base64'];
		let n = 0;
		for (const { label, entries } of recorded) {
			entries.forEach((r, i) => {
				writeFileSync(path.join(recordDir, `${names[i]}_${label}.json`), JSON.stringify({ posthog_js: readPackageVersion(), ...r }, null, '\t') + '\n');
				n++;
			});
		}
		console.log(`recorded ${n} requests into ${recordDir}`);
	}
}

function readPackageVersion() {
	return JSON.parse(readFileSync(path.join(here, 'node_modules', 'posthog-js', 'package.json'), 'utf8')).version;
}

let code = 0;
try {
	await main();
} catch (e) {
	console.error(e);
	code = 1;
} finally {
	if (browser) await browser.close().catch(() => {});
	if (caddy && caddy.exitCode === null) {
		const gone = new Promise((r) => caddy.once('exit', r));
		caddy.kill('SIGTERM');
		await gone;
	}
	posthog.close();
	upstream.close();
	rmSync(tmp, { recursive: true, force: true });
}
for (const f of failures) console.error(`FAIL: ${f}`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(code || (failed > 0 ? 1 : 0));
