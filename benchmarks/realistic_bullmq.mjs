// The Flowcraft TS side of benchmarks/realistic.py: BullMQAdapter + RedisCoordinationStore as in
// ../shared/peers/ts/bullmq.mjs (runs started the way its example client does, completion polled
// on workflow:status:<runId>), with nodes that sleep, and the BullMQ Worker's concurrency raised
// with BullMQ's own `Worker.concurrency` setter on `adapter.worker` (the adapter hard-codes 5), as
// that peer's README documents. realistic.py copies this file beside the peer's node_modules.
//
//   fan_threads  start -> FAN nodes sleeping FAN_MS -> join (start and join sleep ENDS_MS), one worker at concurrency THREADS
//   fan_procs    the same on PROCS worker processes at concurrency 1 (each one's share of the nodes)
//   chains       RUNS concurrent runs of a CHAIN-node chain sleeping CHAIN_MS, concurrency CHAIN_THREADS
//
// Redis DB 15 (the peer's); only this invocation's keys are deleted afterwards. One JSON line.
import { spawn } from 'node:child_process'
import { BullMQAdapter, RedisCoordinationStore } from '@flowcraft/bullmq-adapter'
import { Queue } from 'bullmq'
import { analyzeBlueprint, createFlow, FlowRuntime, NullLogger } from 'flowcraft'
import Redis from 'ioredis'

const opts = { fan: 100, 'fan-ms': 50, 'ends-ms': 0, threads: 16, procs: 4, runs: 20, chain: 10, 'chain-ms': 20, 'chain-threads': 8,
	repeat: 3, timeout: 120, worker: 0, concurrency: 1, queue: '' }
const argv = process.argv.slice(2)
for (let i = 0; i < argv.length; i += 2) opts[argv[i].replace(/^--/, '')] = argv[i + 1]
for (const k of Object.keys(opts)) if (k !== 'queue') opts[k] = Number(opts[k])
const QUEUE = opts.queue || `fcreal-bullmq-${Math.random().toString(16).slice(2, 10)}`
const redisOptions = (extra = {}) => ({ host: '127.0.0.1', port: 6379, db: 15, ...extra })
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const now = () => performance.now()

function flows(counter) {
	const nap = async (ms) => {
		await sleep(ms)
		if (counter) await counter()
	}
	const fan = createFlow(`real-fan-${opts.fan}`)
	fan.node('start', async () => {
		await nap(opts['ends-ms'])
		return { output: 0 }
	})
	for (let i = 0; i < opts.fan; i++) {
		fan.node(`p${i}`, async ({ input }) => {
			await nap(opts['fan-ms'])
			return { output: input + i }
		})
		fan.edge('start', `p${i}`)
		fan.edge(`p${i}`, 'join')
	}
	fan.node('join', async ({ context }) => {
		await nap(opts['ends-ms'])
		const ctx = await context.toJSON()
		let count = 0
		let sum = 0
		for (let i = 0; i < opts.fan; i++) {
			const v = ctx[`_outputs.p${i}`]
			if (v !== undefined) {
				count++
				sum += v
			}
		}
		return { output: { count, sum } }
	})
	const chain = createFlow(`real-chain-${opts.chain}`)
	chain.node('n0', async ({ context }) => {
		await nap(opts['chain-ms'])
		return { output: (await context.get('value')) + 1 }
	})
	for (let i = 1; i < opts.chain; i++) {
		chain.node(`n${i}`, async ({ input }) => {
			await nap(opts['chain-ms'])
			return { output: input + 1 }
		})
		chain.edge(`n${i - 1}`, `n${i}`)
	}
	return { fan, chain }
}

async function startWorker(concurrency, counter) {
	const conn = new Redis(redisOptions({ maxRetriesPerRequest: null }))
	const { fan, chain } = flows(counter ? () => conn.hincrby(`${QUEUE}:counts`, String(process.pid), 1) : null)
	const blueprints = { [fan.toBlueprint().id]: fan.toBlueprint(), [chain.toBlueprint().id]: chain.toBlueprint() }
	const registry = Object.fromEntries([...fan.getFunctionRegistry(), ...chain.getFunctionRegistry()])
	const runtime = new FlowRuntime({ blueprints, registry, logger: new NullLogger() })
	const adapter = new BullMQAdapter({ runtimeOptions: runtime.options, coordinationStore: new RedisCoordinationStore(conn),
		connection: conn, queueName: QUEUE })
	adapter.start()
	adapter.worker.concurrency = concurrency // BullMQ's setter (the adapter hard-codes 5)
	await adapter.worker.waitUntilReady()
	return { adapter, conn }
}

async function client() {
	const redis = new Redis(redisOptions({ maxRetriesPerRequest: null }))
	const queue = new Queue(QUEUE, { connection: redis })
	await queue.waitUntilReady()
	const { fan, chain } = flows(null)
	const started = []
	async function run(flow, initial) {
		const bp = flow.toBlueprint()
		const runId = crypto.randomUUID()
		started.push(runId)
		const state = { ...initial, blueprintId: bp.id, blueprintVersion: bp.metadata?.version || null }
		const fields = []
		for (const [k, v] of Object.entries(state)) fields.push(k, JSON.stringify(v))
		await redis.hset(`workflow:state:${runId}`, ...fields)
		await queue.addBulk(analyzeBlueprint(bp).startNodeIds.map((nodeId) => ({ name: 'executeNode', data: { runId, blueprintId: bp.id, nodeId } })))
		return runId
	}
	async function waitAll(runIds) {
		const deadline = now() + opts.timeout * 1000
		const results = {}
		let pending = [...runIds]
		while (pending.length) {
			const vals = await redis.mget(pending.map((id) => `workflow:status:${id}`))
			pending = pending.filter((id, k) => {
				if (vals[k] === null) return true
				results[id] = JSON.parse(vals[k])
				return false
			})
			if (pending.length) {
				if (now() > deadline) throw new Error(`${pending.length} runs not finished after ${opts.timeout}s`)
				await sleep(2)
			}
		}
		return results
	}
	return { redis, queue, fan, chain, run, waitAll, started }
}

function checkFan(results) {
	for (const r of Object.values(results)) {
		const j = r.payload?.context?.['_outputs.join']
		if (r.status !== 'completed' || !j || j.count !== opts.fan || j.sum !== (opts.fan * (opts.fan - 1)) / 2)
			throw new Error(`fan run: ${JSON.stringify(r).slice(0, 300)}`)
	}
}

function checkChain(results) {
	for (const r of Object.values(results)) {
		if (r.status !== 'completed' || r.payload?.context?.[`_outputs.n${opts.chain - 1}`] !== opts.chain)
			throw new Error(`chain run: ${JSON.stringify(r).slice(0, 300)}`)
	}
}

function childWorkers(count) {
	const url = new URL(import.meta.url).pathname
	const args = Object.entries(opts).filter(([k]) => !['worker', 'concurrency', 'queue'].includes(k)).flatMap(([k, v]) => [`--${k}`, String(v)])
	return Array.from({ length: count }, () => spawn(process.execPath, [url, ...args, '--worker', '1', '--concurrency', '1', '--queue', QUEUE],
		{ stdio: ['ignore', 'pipe', 'inherit'] }))
}

async function ready(child) {
	await new Promise((resolve, reject) => {
		child.stdout.on('data', (d) => { if (String(d).includes('ready')) resolve() })
		child.on('exit', (code) => reject(new Error(`worker exited ${code}`)))
	})
}

async function main() {
	const c = await client()
	const shapes = {}
	try {
		for (const [shape, procs, conc] of [['fan_threads', 1, opts.threads], ['fan_procs', opts.procs, 1], ['chains', 1, opts['chain-threads']]]) {
			let local = null
			let children = []
			if (procs === 1) local = await startWorker(conc, null)
			else {
				children = childWorkers(procs)
				await Promise.all(children.map(ready))
			}
			try {
				if (shape === 'chains') {
					checkChain(await c.waitAll([await c.run(c.chain, { value: 0 })])) // warm-up
					const t0 = now()
					const ids = []
					for (let i = 0; i < opts.runs; i++) ids.push(await c.run(c.chain, { value: 0 }))
					checkChain(await c.waitAll(ids))
					const wall = (now() - t0) / 1000
					const nodes = opts.runs * opts.chain
					shapes[shape] = { wall_s: Number(wall.toFixed(3)), node_executions: nodes, nodes_per_s: Number((nodes / wall).toFixed(1)), concurrency: conc }
				} else {
					checkFan(await c.waitAll([await c.run(c.fan, {})])) // warm-up
					await c.redis.del(`${QUEUE}:counts`)
					const walls = []
					for (let i = 0; i < opts.repeat; i++) {
						const t0 = now()
						checkFan(await c.waitAll([await c.run(c.fan, {})]))
						walls.push((now() - t0) / 1000)
					}
					walls.sort((a, b) => a - b)
					const entry = { wall_s: Number(walls[Math.floor(walls.length / 2)].toFixed(3)), walls_s: walls.map((w) => Number(w.toFixed(3))), concurrency: conc }
					if (procs > 1) {
						const counts = Object.values(await c.redis.hgetall(`${QUEUE}:counts`)).map(Number)
						while (counts.length < procs) counts.push(0)
						const total = counts.reduce((a, b) => a + b, 0) || 1
						entry.shares = counts.map((n) => Number((n / total).toFixed(3))).sort((a, b) => a - b)
					}
					shapes[shape] = entry
				}
			} finally {
				if (local) {
					await local.adapter.close()
					await local.conn.quit()
				}
				for (const child of children) child.kill('SIGTERM')
			}
		}
		process.stdout.write(`${JSON.stringify({ ok: true, peer: 'flowcraft-ts-bullmq', shapes })}\n`)
	} catch (error) {
		process.stdout.write(`${JSON.stringify({ ok: false, error: String(error?.stack || error).slice(0, 800) })}\n`)
		process.exitCode = 1
	} finally {
		let cursor = '0'
		for (const pattern of [`bull:${QUEUE}:*`, `${QUEUE}:*`]) {
			do {
				const [next, keys] = await c.redis.scan(cursor, 'MATCH', pattern, 'COUNT', 1000)
				cursor = next
				if (keys.length) await c.redis.del(...keys)
			} while (cursor !== '0')
		}
		for (const id of c.started) await c.redis.del(`workflow:state:${id}`, `workflow:status:${id}`)
		await c.queue.close()
		await c.redis.quit()
	}
}

if (opts.worker) {
	const w = await startWorker(opts.concurrency, true)
	process.stdout.write('ready\n')
	process.on('SIGTERM', async () => {
		await w.adapter.close()
		await w.conn.quit()
		process.exit(0)
	})
} else {
	await main()
}
