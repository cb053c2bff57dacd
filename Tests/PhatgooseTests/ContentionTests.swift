import CPhatgooseSystem
import Foundation
import PhatgooseRouting
@testable import PhatgooseRuntime
import Synchronization
import Testing

/// The pinned pool's contention window and the scheduler's answer to it: small dispatches on the caller alone while
/// the workers' CPUs are contended, large ones still shared, the same bits either way.
@Suite("contention", .serialized)
struct ContentionTests {
    @Test("a sighting of contention opens a window that doubles when contention comes back soon and starts over when not, and that reopens while the machine stays oversubscribed")
    func windowGrowsAndResets() throws {
        let busy = Atomic<Bool>(false)
        let pool = PinnedWorkerPool(topology: Topology.detect(), workers: 1, spinMicroseconds: 0,
                                    oversubscribed: { busy.load(ordering: .relaxed) })
        defer { pool.shutdown() }
        #expect(!pool.prefersCallerAlone)
        let first = PinnedWorkerPool.firstContentionWindow, longest = PinnedWorkerPool.longestContentionWindow
        // Times in the past (20 s ago and after), so the windows they open are over.
        let t0: UInt64 = pg_now_ns() - 20_000_000_000
        #expect(pool.noteContention(now: t0) == first)
        #expect(pool.noteContention(now: t0 + first / 2) == 2 * first)
        var t = t0 + first / 2, window = 2 * first
        for _ in 0..<10 {
            t += window
            window = pool.noteContention(now: t)
        }
        #expect(window == longest)
        #expect(pool.noteContention(now: t + 4 * longest) == first)  // quiet for four windows: start over
        #expect(!pool.prefersCallerAlone)
        let now = pg_now_ns()
        #expect(pool.noteContention(now: now) == first)
        #expect(pool.contentionWindowEnd == now + first)
        // Another worker's sighting that carries an earlier time is recent too.
        #expect(pool.noteContention(now: now - 1_000_000) == 2 * first)
        #expect(pool.contentionSightings == 15)
        // When the window ends on a machine still oversubscribed, it opens again without a sighting; else it closes.
        busy.store(true, ordering: .relaxed)
        Thread.sleep(forTimeInterval: Double(first) * 4 / 1e9)
        #expect(pool.prefersCallerAlone)
        busy.store(false, ordering: .relaxed)
        Thread.sleep(forTimeInterval: Double(first) * 4 / 1e9)
        #expect(!pool.prefersCallerAlone)
        #expect(pool.contentionSightings == 15)
    }

    @Test("while contended, dispatches under 64 tokens run on the caller alone and larger ones keep their workers; the bits do not change; contendedMinTokens 0 turns it off")
    func smallDispatchesStayOnTheCaller() throws {
        let library = try synthLibrary()
        let recorder = RecordingObserver()
        let runtime = try Runtime(library: library, options: RuntimeOptions(routing: RoutingOptions(topK: 2), workers: 1, tileRows: 2,
                                                                            spinMicroseconds: 0, observer: recorder))
        defer { runtime.shutdown() }
        let pool = try #require(runtime.executor as? PinnedWorkerPool)
        let module = library.modules[0]
        let layer = runtime.layer(named: module.name)!
        func alone(tokens: Int) throws -> Bool {
            recorder.events.withLock { $0.removeAll() }
            let x = randomFloats(tokens * module.inWidth, seed: UInt64(tokens) + 70)
            let got = try runtime.apply(layer, input: x, tokens: tokens)
            let expected = try singleThreaded(library, module: module.name, options: RoutingOptions(topK: 2), x: x, tokens: tokens)
            #expect(got.delta == expected.delta && got.experts == expected.experts && got.weights == expected.weights, "T=\(tokens)")
            let events = recorder.events.withLock { $0 }
            return events.allSatisfy { $0.worker == 0 } && !events.contains { $0.kind == .combine }
        }
        // Tiles of 2 rows give every expert phase several items, so a dispatch that may fan out has a combine phase.
        // Suites run side by side: when the worker saw a real preemption, the pool may rightly have kept it alone.
        let fannedOut = try !alone(tokens: 8)
        if pool.contentionSightings == 0 { #expect(fannedOut) }
        // Sightings in quick succession grow the window to its longest, enough for each call below.
        func contend() { for _ in 0..<6 { pool.noteContention() } }
        contend()
        #expect(pool.prefersCallerAlone)
        #expect(try alone(tokens: 8))
        contend()
        #expect(try alone(tokens: 63))
        contend()
        #expect(try !alone(tokens: 64))
        // contendedMinTokens 0: contention moves nothing.
        let fanning = try Runtime(library: library, options: RuntimeOptions(routing: RoutingOptions(topK: 2), workers: 1, tileRows: 2,
                                                                            spinMicroseconds: 0, contendedMinTokens: 0, observer: recorder))
        defer { fanning.shutdown() }
        let fanningPool = try #require(fanning.executor as? PinnedWorkerPool)
        for _ in 0..<6 { fanningPool.noteContention() }
        #expect(fanningPool.prefersCallerAlone)
        recorder.events.withLock { $0.removeAll() }
        let x = randomFloats(8 * module.inWidth, seed: 78)
        _ = try fanning.apply(fanning.layer(named: module.name)!, input: x, tokens: 8)
        #expect(recorder.events.withLock { $0 }.contains { $0.kind == .combine }, "a dispatch that fans out has a combine phase")
    }

    @Test("a worker that shares its CPU with a busy thread sees it was preempted")
    func busyNeighbourIsSeen() throws {
        let library = try synthLibrary()
        let runtime = try Runtime(library: library, options: RuntimeOptions(routing: RoutingOptions(topK: 2), workers: 1, tileRows: 8))
        defer { runtime.shutdown() }
        let pool = try #require(runtime.executor as? PinnedWorkerPool)
        let cpu = try #require(pool.participantCPUs[1])
        let module = library.modules[0]
        let layer = runtime.layer(named: module.name)!
        let x = randomFloats(512 * module.inWidth, seed: 80)
        let before = pool.contentionSightings
        // A thread pinned to the worker's CPU that never sleeps, for as long as the calls need.
        let stop = Atomic<Bool>(false)
        let neighbour = Thread {
            _ = pg_pin_current_thread(Int32(cpu))
            var spins = 0
            while !stop.load(ordering: .relaxed) { spins &+= 1 }
        }
        neighbour.start()
        defer { stop.store(true, ordering: .relaxed) }
        let deadline = Date().addingTimeInterval(10)
        while pool.contentionSightings == before && Date() < deadline {
            _ = try runtime.apply(layer, input: x, tokens: 512)
        }
        #expect(pool.contentionSightings > before)
        // With the neighbour still there, small dispatches now go to the caller alone.
        #expect(pool.prefersCallerAlone)
    }
}
