import Dispatch
import Foundation
import PhatgooseLibrary
import PhatgooseRouting
import PhatgooseRuntime
import Synchronization
import Testing

/// Waits (bounded) until `condition` holds.
func waitUntil(seconds: Double = 20, _ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while !condition() {
        if Date() > deadline { return false }
        usleep(200)
    }
    return true
}

/// ``waitUntil`` for async tests: sleeps as a task between looks, so the cooperative thread it runs on stays free for
/// other tasks (on a 2-core machine the pool has two threads; one blocked per waiting test would starve the tasks
/// being waited for).
func awaitUntil(seconds: Double = 20, _ condition: () -> Bool) async -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while !condition() {
        if Date() > deadline { return false }
        try? await Task.sleep(nanoseconds: 200_000)
    }
    return true
}

/// One call of the mix the merged-dispatch tests send: a module, a token count and its input.
struct MixedCall: Sendable {
    var module: String
    var tokens: Int
    var x: [Float]
}

@Suite("merged dispatch", .serialized)
struct MergedDispatchTests {
    static let configurations: [(workers: Int, topology: String?)] = [(0, nil), (1, nil), (3, "0;1;0;1")]

    /// Calls at every module, of 1 to 300 tokens, several per module, with their single-threaded results.
    static func mix(_ library: ExpertLibrary, routing: RoutingOptions, count: Int) throws -> [(call: MixedCall, expected: (delta: [Float], experts: [Int32], weights: [Float]))] {
        let sizes = [1, 3, 40, 1, 300, 2, 17]
        return try (0..<count).map { i in
            let module = library.modules[i % library.modules.count]
            let tokens = sizes[i % sizes.count]
            let x = randomFloats(tokens * module.inWidth, seed: UInt64(700 + i))
            return (MixedCall(module: module.name, tokens: tokens, x: x),
                    try singleThreaded(library, module: module.name, options: routing, x: x, tokens: tokens))
        }
    }

    /// Calls sent by ``send(_:to:)``: how many returned, and how many failed or differ from the single-threaded results.
    final class SentCalls: Sendable {
        let finished = Atomic<Int>(0)
        let mismatches = Atomic<Int>(0)
    }

    /// Sends each call of `calls` from a thread of its own.
    static func send(_ calls: [(call: MixedCall, expected: (delta: [Float], experts: [Int32], weights: [Float]))], to runtime: Runtime) -> SentCalls {
        let sent = SentCalls()
        for (call, expected) in calls {
            Thread {
                defer { sent.finished.add(1, ordering: .sequentiallyConsistent) }
                guard let got = try? runtime.apply(runtime.layer(named: call.module)!, input: call.x, tokens: call.tokens),
                      got.delta == expected.delta, got.experts == expected.experts, got.weights == expected.weights else {
                    sent.mismatches.add(1, ordering: .sequentiallyConsistent)
                    return
                }
            }.start()
        }
        return sent
    }

    @Test("calls queued together run as one dispatch, at one layer and at several, and each gets its single-threaded bits",
          arguments: configurations.indices)
    func mergedCallsKeepTheirBits(_ configuration: Int) throws {
        let (workers, spec) = Self.configurations[configuration]
        let library = try synthLibrary()
        for routing in [RoutingOptions(topK: 2), RoutingOptions(router: .arrow, topK: 3), RoutingOptions(router: .uniform),
                        RoutingOptions(topK: 2, granularity: .sequence(length: 7)), RoutingOptions(topK: 1)] {
            let gate = GateObserver()
            let runtime = try Runtime(library: library, options: RuntimeOptions(
                routing: routing, workers: workers, topology: try spec.map { try Topology.modelled($0) }, maxQueuedCalls: 64,
                chunkTokens: 64, lanes: 1, oversubscribe: true, observer: gate))
            defer { runtime.shutdown() }
            let calls = try Self.mix(library, routing: routing, count: 14)
            // The first call holds the executor (the gate) until every other call is queued behind it; then one
            // dispatch takes them all.
            let first = randomFloats(5 * library.modules[0].inWidth, seed: 1)
            let holder = Thread { _ = try? runtime.apply(runtime.layer(named: library.modules[0].name)!, input: first, tokens: 5) }
            holder.start()
            gate.entered.wait()
            let sent = Self.send(calls, to: runtime)
            #expect(waitUntil { runtime.queuedCalls == calls.count + 1 }, "every call queued behind the held one")
            gate.release.signal()
            #expect(waitUntil { sent.finished.load(ordering: .sequentiallyConsistent) == calls.count })
            #expect(sent.mismatches.load(ordering: .sequentiallyConsistent) == 0, "\(workers) workers, \(routing.router) \(routing.granularity)")
            let stats = runtime.statisticsSnapshot()
            #expect(stats.calls == calls.count + 1)
            // Every queued call was served with others (the 300-token calls in chunks of 64 over several dispatches).
            #expect(stats.mergedCalls == calls.count, "merged \(stats.mergedCalls) of \(calls.count)")
            #expect(stats.dispatches < calls.count, "\(stats.dispatches) dispatches for \(calls.count + 1) calls")
        }
    }

    @Test("several layers sharing one input, queued with other calls, give the bits of separate calls; outputs that overlap are refused")
    func mergedMultiLayerCalls() throws {
        let library = try synthLibrary()
        let gate = GateObserver()
        let runtime = try Runtime(library: library, options: RuntimeOptions(workers: 1, chunkTokens: 8, lanes: 1, observer: gate))
        defer { runtime.shutdown() }
        let q = library.modules[0], k = library.modules[1]
        let x = randomFloats(30 * 64, seed: 21)
        let expectedQ = try singleThreaded(library, module: q.name, options: runtime.routing, x: x, tokens: 30).delta
        let expectedK = try singleThreaded(library, module: k.name, options: runtime.routing, x: x, tokens: 30).delta
        let holder = Thread { _ = try? runtime.apply(runtime.layer(named: q.name)!, input: x, tokens: 3) }
        holder.start()
        gate.entered.wait()
        let results = Locked<[[Float]]>([])
        let done = DispatchSemaphore(value: 0)
        for _ in 0..<3 {
            Thread {
                defer { done.signal() }
                var outQ = [Float](repeating: 0, count: 30 * 64), outK = [Float](repeating: 0, count: 30 * 48)
                x.withUnsafeBufferPointer { input in
                    outQ.withUnsafeMutableBufferPointer { oq in
                        outK.withUnsafeMutableBufferPointer { ok in
                            _ = try? runtime.apply([runtime.layer(named: q.name)!, runtime.layer(named: k.name)!], input: input, tokens: 30, outputs: [oq, ok])
                        }
                    }
                }
                results.withLock { $0.append(outQ); $0.append(outK) }
            }.start()
        }
        #expect(waitUntil { runtime.queuedCalls == 4 })
        gate.release.signal()
        for _ in 0..<3 { done.wait() }
        let got = results.withLock { $0 }
        #expect(got.count == 6)
        for pair in stride(from: 0, to: got.count, by: 2) { #expect(got[pair] == expectedQ && got[pair + 1] == expectedK) }
        // One buffer for both layers would be written by two layers at once.
        var shared = [Float](repeating: 0, count: 30 * 64)
        let error = x.withUnsafeBufferPointer { input in
            shared.withUnsafeMutableBufferPointer { out in
                #expect(throws: RuntimeError.self) {
                    try runtime.apply([runtime.layer(named: q.name)!, runtime.layer(named: k.name)!], input: input, tokens: 30,
                                      outputs: [out, UnsafeMutableBufferPointer(rebasing: out[64...])])
                }
            }
        }
        #expect(error?.code == .shape && error?.message.contains("do not overlap") == true, "\(String(describing: error))")
    }

    @Test("a large call is served in chunks: a call queued behind it joins the next dispatch and finishes first, with the same bits")
    func chunkedPrefillLetsDecodeThrough() throws {
        let library = try synthLibrary()
        let gate = GateObserver()
        let runtime = try Runtime(library: library, options: RuntimeOptions(workers: 1, chunkTokens: 16, lanes: 1, observer: gate))
        defer { runtime.shutdown() }
        let module = library.modules[2]
        let layer = try #require(runtime.layer(named: module.name))
        let prefillTokens = 3000
        let prefill = randomFloats(prefillTokens * module.inWidth, seed: 31), decode = randomFloats(module.inWidth, seed: 32)
        let expectedPrefill = try singleThreaded(library, module: module.name, options: runtime.routing, x: prefill, tokens: prefillTokens)
        let expectedDecode = try singleThreaded(library, module: module.name, options: runtime.routing, x: decode, tokens: 1)
        let prefillResult = Locked<[Float]>([])
        let finished = DispatchSemaphore(value: 0)
        Thread {
            let got = try? runtime.apply(layer, input: prefill, tokens: prefillTokens)
            prefillResult.withLock { $0 = got?.delta ?? [] }
            finished.signal()
        }.start()
        gate.entered.wait()  // the prefill's first chunk is in its dispatch
        gate.release.signal()
        let got = try runtime.apply(layer, input: decode, tokens: 1)
        finished.wait()
        // In the order the calls completed (not when their callers ran again, which a busy machine delays).
        #expect(gate.completions.withLock { $0 } == [1, prefillTokens], "the decode call waited for the whole prefill")
        #expect(got.delta == expectedDecode.delta && got.experts == expectedDecode.experts)
        #expect(prefillResult.withLock { $0 } == expectedPrefill.delta)
        #expect(runtime.statisticsSnapshot().dispatches >= prefillTokens / 16)
    }

    @Test("a dispatch holds at most dispatchTokens tokens; a chunked call goes behind the calls queued after it; every call keeps its bits")
    func dispatchBudgetAndRoundRobin() throws {
        let library = try synthLibrary()
        let gate = GateObserver()
        let runtime = try Runtime(library: library, options: RuntimeOptions(workers: 1, chunkTokens: 16, dispatchTokens: 16, lanes: 1, observer: gate))
        defer { runtime.shutdown() }
        let module = library.modules[2]
        let layer = try #require(runtime.layer(named: module.name))
        let inputs = [randomFloats(160 * module.inWidth, seed: 41), randomFloats(160 * module.inWidth, seed: 42), randomFloats(module.inWidth, seed: 43)]
        let sizes = [160, 160, 1]
        let expected = try zip(inputs, sizes).map { try singleThreaded(library, module: module.name, options: runtime.routing, x: $0, tokens: $1) }
        let holder = Thread { _ = try? runtime.apply(layer, input: inputs[2], tokens: 1) }
        holder.start()
        gate.entered.wait()
        // Two prefills, then a decode call, queued in this order behind the held call.
        let results = Locked<[Int: LayerOutput]>([:])
        let done = DispatchSemaphore(value: 0)
        for i in 0..<3 {
            Thread {
                defer { done.signal() }
                guard let got = try? runtime.apply(layer, input: inputs[i], tokens: sizes[i]) else { return }
                results.withLock { $0[i] = got }
            }.start()
            #expect(waitUntil { runtime.queuedCalls == i + 2 }, "call \(i) queued")
        }
        gate.release.signal()
        for _ in 0..<3 { done.wait() }
        let got = results.withLock { $0 }
        for i in 0..<3 {
            #expect(got[i]?.delta == expected[i].delta && got[i]?.experts == expected[i].experts && got[i]?.weights == expected[i].weights, "call \(i)")
        }
        // Round robin: after one chunk of each prefill the decode call's turn came, with both prefills unfinished,
        // so it completed right after the held call. First come, first served without turns would finish both
        // prefills first.
        #expect(gate.completions.withLock { $0 } == [1, 1, 160, 160])
        // 321 tokens queued, at most 16 per dispatch, after the held call's own dispatch.
        let dispatches = runtime.statisticsSnapshot().dispatches
        #expect(dispatches >= 1 + (321 + 15) / 16, "\(dispatches) dispatches")
        let refused = #expect(throws: RuntimeError.self) { _ = try Runtime(library: library, options: RuntimeOptions(workers: 0, dispatchTokens: 0)) }
        #expect(refused?.code == .option && refused?.message.contains("dispatch tokens: expected at least 1, found 0") == true)
    }

    @Test("async calls queue without a thread each, share dispatches and get their single-threaded bits")
    func asyncCallsMerge() async throws {
        let library = try synthLibrary()
        let gate = GateObserver()
        let runtime = try Runtime(library: library, options: RuntimeOptions(workers: 1, maxQueuedCalls: 256, dispatchTokens: nil, lanes: 1, observer: gate))
        defer { runtime.shutdown() }
        let calls = try Self.mix(library, routing: runtime.routing, count: 120)
        let first = randomFloats(5 * library.modules[0].inWidth, seed: 1)
        let holder = Thread { _ = try? runtime.apply(runtime.layer(named: library.modules[0].name)!, input: first, tokens: 5) }
        holder.start()
        gate.entered.wait()
        // 120 suspended tasks wait in the queue at once (more than the cooperative pool has threads).
        let mismatches = try await withThrowingTaskGroup(of: Bool.self) { group in
            for (call, expected) in calls {
                group.addTask {
                    let got = try await runtime.applyAsync(runtime.layer(named: call.module)!, input: call.x, tokens: call.tokens)
                    return got.delta == expected.delta && got.experts == expected.experts && got.weights == expected.weights
                }
            }
            #expect(await awaitUntil { runtime.queuedCalls == calls.count + 1 }, "queued: \(runtime.queuedCalls)")
            gate.release.signal()
            var mismatches = 0
            for try await same in group where !same { mismatches += 1 }
            return mismatches
        }
        #expect(mismatches == 0)
        let stats = runtime.statisticsSnapshot()
        #expect(stats.calls == calls.count + 1 && stats.mergedCalls == calls.count, "merged \(stats.mergedCalls)")
    }

    @Test("more workers than CPUs are refused, naming the option; oversubscribe allows them; a chunk of 0 tokens is refused")
    func oversubscriptionIsRefused() throws {
        let library = try synthLibrary()
        let topology = try Topology.modelled("0;1")
        let error = #expect(throws: RuntimeError.self) {
            _ = try Runtime(library: library, options: RuntimeOptions(workers: topology.cpuCount + 1, topology: topology))
        }
        #expect(error?.code == .option && error?.message.contains("workers: expected at most \(topology.cpuCount)") == true
                && error?.message.contains("oversubscribe") == true, "\(String(describing: error))")
        let allowed = try Runtime(library: library, options: RuntimeOptions(workers: topology.cpuCount + 1, topology: topology, oversubscribe: true))
        #expect(allowed.participants == topology.cpuCount + 2)
        allowed.shutdown()
        let chunk = #expect(throws: RuntimeError.self) { _ = try Runtime(library: library, options: RuntimeOptions(workers: 0, chunkTokens: 0)) }
        #expect(chunk?.message.contains("chunk tokens") == true)
    }
}
