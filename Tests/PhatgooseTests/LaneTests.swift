import Dispatch
import Foundation
import PhatgooseLibrary
import PhatgooseRouting
@testable import PhatgooseRuntime
import Synchronization
import Testing

/// Dispatch lanes: independent calls served side by side, each lane's dispatch on its holder alone while another
/// lane is held, every call with its single-threaded bits, and no lane left held once the calls are done.
@Suite("dispatch lanes", .serialized)
struct LaneTests {
    @Test("while one lane's dispatch is held, another lane serves the calls queued behind it, alone, with their single-threaded bits; with one lane they wait")
    func secondLaneServesWhileFirstIsHeld() throws {
        let library = try synthLibrary()
        for lanes in [2, 1] {
            let gate = GateObserver()
            let runtime = try Runtime(library: library, options: RuntimeOptions(routing: RoutingOptions(topK: 2), workers: 1, lanes: lanes, observer: gate))
            defer { runtime.shutdown() }
            #expect(runtime.laneCount == lanes)
            let calls = try MergedDispatchTests.mix(library, routing: runtime.routing, count: 6)
            let first = randomFloats(5 * library.modules[0].inWidth, seed: 1)
            let holder = Thread { _ = try? runtime.apply(runtime.layer(named: library.modules[0].name)!, input: first, tokens: 5) }
            holder.start()
            gate.entered.wait()  // lane 0's dispatch is held inside its plan
            let sent = MergedDispatchTests.send(calls, to: runtime)
            if lanes == 2 {
                #expect(waitUntil { sent.finished.load(ordering: .sequentiallyConsistent) == calls.count }, "lane 1 served the calls while lane 0 was held")
                let stats = runtime.statisticsSnapshot()
                #expect(stats.calls == calls.count && stats.concurrentDispatches == stats.dispatches,
                        "\(stats.calls) calls, \(stats.concurrentDispatches) of \(stats.dispatches) dispatches alone")
            } else {
                #expect(waitUntil { runtime.queuedCalls == calls.count + 1 }, "every call queued behind the held one")
                usleep(50_000)
                #expect(sent.finished.load(ordering: .sequentiallyConsistent) == 0, "with one lane nothing passes the held dispatch")
            }
            gate.release.signal()
            #expect(waitUntil { sent.finished.load(ordering: .sequentiallyConsistent) == calls.count })
            #expect(sent.mismatches.load(ordering: .sequentiallyConsistent) == 0, "\(lanes) lanes")
            #expect(waitUntil { runtime.heldLanes == 0 && runtime.queuedCalls == 0 }, "held lanes \(runtime.heldLanes)")
            #expect(runtime.statisticsSnapshot().calls == calls.count + 1)
        }
    }

    @Test("many threads and tasks calling at once over 2 and 4 lanes: every call keeps its bits, and afterwards no lane is held",
          arguments: [(1, nil as String?), (3, "0;1;0;1")])
    func manyCallersLeaveNoLaneHeld(_ workers: Int, _ spec: String?) async throws {
        let library = try synthLibrary()
        let runtime = try Runtime(library: library, options: RuntimeOptions(
            routing: RoutingOptions(topK: 2), workers: workers, topology: try spec.map { try Topology.modelled($0) }, maxQueuedCalls: 256,
            chunkTokens: 32, oversubscribe: true))
        defer { runtime.shutdown() }
        #expect(runtime.laneCount == workers + 1)
        let calls = try MergedDispatchTests.mix(library, routing: runtime.routing, count: 21)
        let threads = 16, rounds = 150
        let mismatches = Atomic<Int>(0), finished = Atomic<Int>(0)
        for t in 0..<threads {
            Thread {
                defer { finished.add(1, ordering: .sequentiallyConsistent) }
                for r in 0..<rounds {
                    let (call, expected) = calls[(t * 7 + r) % calls.count]
                    guard let got = try? runtime.apply(runtime.layer(named: call.module)!, input: call.x, tokens: call.tokens),
                          got.delta == expected.delta, got.experts == expected.experts, got.weights == expected.weights else {
                        mismatches.add(1, ordering: .sequentiallyConsistent)
                        continue
                    }
                }
            }.start()
        }
        // Tasks too: they hold a lane only while no thread can take it.
        let taskMismatches = await withTaskGroup(of: Int.self) { group in
            for i in 0..<24 {
                group.addTask {
                    let (call, expected) = calls[i % calls.count]
                    guard let got = try? await runtime.applyAsync(runtime.layer(named: call.module)!, input: call.x, tokens: call.tokens) else { return 1 }
                    return got.delta == expected.delta && got.experts == expected.experts && got.weights == expected.weights ? 0 : 1
                }
            }
            return await group.reduce(0, +)
        }
        #expect(await awaitUntil(seconds: 120) { finished.load(ordering: .sequentiallyConsistent) == threads })
        #expect(mismatches.load(ordering: .sequentiallyConsistent) == 0 && taskMismatches == 0)
        #expect(await awaitUntil { runtime.heldLanes == 0 && runtime.queuedCalls == 0 }, "held lanes \(runtime.heldLanes), queued \(runtime.queuedCalls)")
        let stats = runtime.statisticsSnapshot()
        #expect(stats.calls == threads * rounds + 24)
        #expect(stats.concurrentDispatches > 0, "no dispatch ran beside another lane's")
    }

    @Test("a lane other than lane 0 that becomes the only one held moves to lane 0 and its dispatches use the workers again, with the same bits")
    func loneLaneMovesToTheWorkers() throws {
        let library = try synthLibrary()
        let observer = GateCountingObserver()
        let runtime = try Runtime(library: library, options: RuntimeOptions(
            routing: RoutingOptions(topK: 2), workers: 1, parallelMinTokens: 8, contendedMinTokens: 0, chunkTokens: 64, lanes: 2, observer: observer))
        defer { runtime.shutdown() }
        let module = library.modules[2]
        let layer = try #require(runtime.layer(named: module.name))
        let small = randomFloats(5 * module.inWidth, seed: 3)
        let holder = Thread { _ = try? runtime.apply(layer, input: small, tokens: 5) }
        holder.start()
        observer.entered.wait()  // lane 0 is held inside its dispatch (5 tokens: on its caller alone)
        let tokens = 4000
        let prefill = randomFloats(tokens * module.inWidth, seed: 4)
        let expected = try singleThreaded(library, module: module.name, options: runtime.routing, x: prefill, tokens: tokens)
        let result = Locked<LayerOutput?>(nil)
        let finished = DispatchSemaphore(value: 0)
        Thread {
            result.withLock { $0 = try? runtime.apply(layer, input: prefill, tokens: tokens) }
            finished.signal()
        }.start()
        // The prefill runs its first chunks on lane 1, alone (its events come as participant 2).
        #expect(waitUntil { observer.items(of: 2) > 0 })
        #expect(observer.items(of: 1) == 0, "the worker ran nothing while lane 0 was held")
        observer.release.signal()
        finished.wait()
        let got = result.withLock { $0 }
        #expect(got?.delta == expected.delta && got?.experts == expected.experts && got?.weights == expected.weights)
        // Once lane 0 was free, the prefill's later chunks ran there, spread over the caller and the worker.
        #expect(observer.items(of: 1) > 0, "worker items \(observer.items(of: 1)), lane 1 items \(observer.items(of: 2))")
        #expect(waitUntil { runtime.heldLanes == 0 })
    }

    @Test("lanes must be 1 to the participants")
    func laneCountIsChecked() throws {
        let library = try synthLibrary()
        for lanes in [0, 3] {
            let error = #expect(throws: RuntimeError.self) { _ = try Runtime(library: library, options: RuntimeOptions(workers: 1, lanes: lanes)) }
            #expect(error?.code == .option && error?.message.contains("lanes: expected 1 to 2") == true && error?.message.contains("found \(lanes)") == true,
                    "\(String(describing: error))")
        }
        let runtime = try Runtime(library: library, options: RuntimeOptions(workers: 0))
        defer { runtime.shutdown() }
        #expect(runtime.laneCount == 1)
    }
}

/// Holds the first dispatch inside its plan (as ``GateObserver``) and counts the expert items each participant ran.
final class GateCountingObserver: RuntimeObserver, @unchecked Sendable {
    let entered = DispatchSemaphore(value: 0)
    let release = DispatchSemaphore(value: 0)
    private let armed = Atomic<Bool>(true)
    private let counts = Locked<[Int: Int]>([:])

    func observe(_ event: RuntimeEvent) {
        if event.kind == .plan, armed.exchange(false, ordering: .sequentiallyConsistent) {
            entered.signal()
            release.wait()
        }
        if event.kind == .item || event.kind == .steal { counts.withLock { $0[event.worker, default: 0] += 1 } }
    }

    func items(of worker: Int) -> Int { counts.withLock { $0[worker] ?? 0 } }
}
