import Dispatch
import Foundation
import PhatgooseLibrary
import PhatgooseRouting
import PhatgooseRuntime
import PhatgooseSynth
import Synchronization
import Testing

/// The single-threaded executor's delta and routing for one module: the reference the runtime must equal bit for bit.
func singleThreaded(_ library: ExpertLibrary, module name: String, options: RoutingOptions, x: [Float], tokens: Int) throws -> (delta: [Float], experts: [Int32], weights: [Float]) {
    let module = library.module(named: name)!
    let router = try LayerRouter(module: module, options: options)
    var out = [Float](repeating: 0, count: tokens * module.outWidth)
    let executor = LayerExecutor()
    executor.apply(module, router: router, x: x, ldx: module.inWidth, tokens: tokens, out: &out, ldo: module.outWidth)
    let experts = executor.routing.candidates.map { $0 < 0 ? -1 : module.experts[Int($0)].expert.rawValue }
    return (out, experts, executor.routing.weights)
}

/// A synthetic in-memory library with several layer shapes.
func synthLibrary(experts: Int = 12, coverage: Double = 0.8, seed: UInt64 = 5) throws -> ExpertLibrary {
    let shape = ModelShape(name: "test", layers: [
        .init(name: "encoder.block.0.layer.0.SelfAttention.q", inWidth: 64, outWidth: 64),
        .init(name: "encoder.block.0.layer.0.SelfAttention.k", inWidth: 64, outWidth: 48),
        .init(name: "encoder.block.0.layer.1.DenseReluDense.wo", inWidth: 96, outWidth: 64),
    ])
    return try Synth.library(SynthOptions(shape: shape, experts: experts, rank: 8, weightDType: .bf16, seed: seed, tasks: 4, coverage: coverage))
}

/// Blocks the first routing event until released, to hold a call inside the runtime.
final class GateObserver: RuntimeObserver, @unchecked Sendable {
    let entered = DispatchSemaphore(value: 0)
    let release = DispatchSemaphore(value: 0)
    private let armed = Atomic<Bool>(true)
    /// The tokens of each call as it completes, in order (the runtime reports a call when its last chunk is served).
    let completions = Locked<[Int]>([])
    func observe(_ event: RuntimeEvent) {
        if event.kind == .call { completions.withLock { $0.append(event.rows) } }
        if event.kind == .plan, armed.exchange(false, ordering: .sequentiallyConsistent) {
            entered.signal()
            release.wait()
        }
    }
}

/// Records every event.
final class RecordingObserver: RuntimeObserver, Sendable {
    let events = Locked<[RuntimeEvent]>([])
    func observe(_ event: RuntimeEvent) { events.withLock { $0.append(event) } }
}

@Suite("runtime", .serialized)
struct RuntimeTests {
    static let configurations: [(executor: ExecutorKind, workers: Int, tile: Int?, topology: String?)] = [
        (.pinned, 0, nil, nil), (.pinned, 1, nil, nil), (.pinned, 3, 3, nil), (.dispatch, 2, nil, nil), (.pinned, 1, 5, "0;1"), (.pinned, 3, nil, "0;1;0;1"),
    ]

    @Test("results equal the single-threaded executor bit for bit, for every executor, worker count, tile size and topology",
          arguments: configurations.indices)
    func matchesSingleThreaded(_ configuration: Int) throws {
        let (executor, workers, tile, spec) = Self.configurations[configuration]
        let library = try synthLibrary()
        // Top-1 at one token makes a single work item, which may be queued to a participant on another node.
        for routing in [RoutingOptions(topK: 2), RoutingOptions(router: .arrow, topK: 3), RoutingOptions(router: .uniform),
                        RoutingOptions(topK: 2, granularity: .sequence(length: 7)), RoutingOptions(topK: 1)] {
            let runtime = try Runtime(library: library, options: RuntimeOptions(
                routing: routing, workers: workers, executor: executor, topology: try spec.map { try Topology.modelled($0) }, tileRows: tile, oversubscribe: true))
            defer { runtime.shutdown() }
            for module in library.modules {
                for tokens in [1, 5, 300] {
                    let x = randomFloats(tokens * module.inWidth, seed: UInt64(tokens))
                    let expected = try singleThreaded(library, module: module.name, options: routing, x: x, tokens: tokens)
                    let got = try runtime.apply(runtime.layer(named: module.name)!, input: x, tokens: tokens)
                    let same = got.delta == expected.delta, sameRouting = got.experts == expected.experts && got.weights == expected.weights
                    #expect(same && sameRouting, "\(executor) \(workers) workers, \(routing.router) \(routing.granularity), \(module.name), T=\(tokens): delta equal \(same), routing equal \(sameRouting), first difference at \(String(describing: zip(got.delta, expected.delta).enumerated().first { $0.element.0 != $0.element.1 }))")
                }
            }
        }
    }

    @Test("onto a non-zero output (a model's W x + b), every executor adds a token's rows in the same order and gets the same bits",
          arguments: configurations.indices)
    func addsOntoOutputInOneOrder(_ configuration: Int) throws {
        // With an output of zeros the order of two adds cannot show ((0 + a) + b == (0 + b) + a); on a base output it
        // can, and with top-3 a token's slot order (by weight) mostly differs from its experts' index order.
        let (executor, workers, tile, spec) = Self.configurations[configuration]
        let library = try synthLibrary()
        let routing = RoutingOptions(topK: 3)
        let runtime = try Runtime(library: library, options: RuntimeOptions(
            routing: routing, workers: workers, executor: executor, topology: try spec.map { try Topology.modelled($0) }, tileRows: tile, oversubscribe: true))
        defer { runtime.shutdown() }
        for module in library.modules {
            let tokens = 300
            let x = randomFloats(tokens * module.inWidth, seed: 31)
            let base = randomFloats(tokens * module.outWidth, seed: 32).map { $0 * 1000 }
            var expected = base
            try LayerExecutor().apply(module, router: LayerRouter(module: module, options: routing), x: x, ldx: module.inWidth,
                                      tokens: tokens, out: &expected, ldo: module.outWidth)
            var got = base
            try x.withUnsafeBufferPointer { input in
                try got.withUnsafeMutableBufferPointer { output in
                    try runtime.apply(runtime.layer(named: module.name)!, input: input, tokens: tokens, output: output)
                }
            }
            let differences = zip(got, expected).filter { $0 != $1 }.count
            #expect(differences == 0, "\(executor) \(workers) workers, \(module.name): \(differences) of \(got.count) outputs differ")
            #expect(expected != base)
        }
    }

    @Test("many threads call at once and each gets the single-threaded result")
    func concurrentCallers() throws {
        let library = try synthLibrary()
        let runtime = try Runtime(library: library, options: RuntimeOptions(workers: 1, maxQueuedCalls: 1000))
        defer { runtime.shutdown() }
        let name = library.modules[2].name
        let layer = try #require(runtime.layer(named: name))
        let inputs = (0..<6).map { randomFloats(40 * 96, seed: UInt64(50 + $0)) }
        let expected = try inputs.map { try singleThreaded(library, module: name, options: runtime.routing, x: $0, tokens: 40).delta }
        let mismatches = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 96) { i in
            guard let got = try? runtime.apply(layer, input: inputs[i % 6], tokens: 40), got.delta == expected[i % 6] else {
                mismatches.add(1, ordering: .relaxed)
                return
            }
        }
        #expect(mismatches.load(ordering: .relaxed) == 0)
        #expect(runtime.statisticsSnapshot().calls == 96)
    }

    @Test("several layers sharing one input give the same deltas as separate calls")
    func batchedLayers() throws {
        let library = try synthLibrary()
        let runtime = try Runtime(library: library, options: RuntimeOptions(workers: 1))
        defer { runtime.shutdown() }
        let q = runtime.layer(named: library.modules[0].name)!, k = runtime.layer(named: library.modules[1].name)!
        let x = randomFloats(20 * 64, seed: 9)
        var outQ = [Float](repeating: 0, count: 20 * 64), outK = [Float](repeating: 0, count: 20 * 48)
        try x.withUnsafeBufferPointer { input in
            try outQ.withUnsafeMutableBufferPointer { oq in
                try outK.withUnsafeMutableBufferPointer { ok in try runtime.apply([q, k], input: input, tokens: 20, outputs: [oq, ok]) }
            }
        }
        #expect(outQ == (try runtime.apply(q, input: x, tokens: 20)).delta)
        #expect(outK == (try runtime.apply(k, input: x, tokens: 20)).delta)
    }

    @Test("the async form returns the synchronous result")
    func asyncForm() async throws {
        let library = try synthLibrary()
        let runtime = try Runtime(library: library, options: RuntimeOptions(workers: 1))
        defer { runtime.shutdown() }
        let layer = runtime.layer(named: library.modules[0].name)!
        let x = randomFloats(9 * 64, seed: 10)
        let viaAsync = try await runtime.applyAsync(layer, input: x, tokens: 9)
        let viaSync = try runtime.apply(layer, input: x, tokens: 9)
        #expect(viaAsync.delta == viaSync.delta && viaAsync.experts == viaSync.experts)
    }

    @Test("beyond the admission bound a call fails at once with .overloaded")
    func admissionControl() throws {
        let library = try synthLibrary()
        let gate = GateObserver()
        let runtime = try Runtime(library: library, options: RuntimeOptions(workers: 1, maxQueuedCalls: 1, observer: gate))
        defer { runtime.shutdown() }
        let layer = runtime.layer(named: library.modules[0].name)!
        let x = randomFloats(4 * 64, seed: 11)
        let first = DispatchGroup()
        DispatchQueue.global().async(group: first) { _ = try? runtime.apply(layer, input: x, tokens: 4) }
        gate.entered.wait()
        let started = DispatchTime.now()
        var code: RuntimeError.Code?
        do { _ = try runtime.apply(layer, input: x, tokens: 4) } catch let error as RuntimeError { code = error.code } catch {}
        let waited = Double(DispatchTime.now().uptimeNanoseconds - started.uptimeNanoseconds) / 1e9
        gate.release.signal()
        first.wait()
        #expect(code == .overloaded)
        #expect(waited < 5, "the refusal came at once, not after the running call")
        #expect(runtime.statisticsSnapshot().rejected == 1)
        #expect((try? runtime.apply(layer, input: x, tokens: 4)) != nil, "after the running call ends, calls are admitted again")
    }

    @Test("adding and removing experts while calls are in flight: every call sees one whole library")
    func liveChanges() throws {
        let directory = TemporaryDirectory()
        // Library of 6 experts on disk, plus one more expert directory to add.
        let shape = ModelShape(name: "t", layers: [.init(name: "encoder.block.0.layer.0.SelfAttention.q", inWidth: 32, outWidth: 32)])
        try Synth.writeLibrary(SynthOptions(shape: shape, experts: 7, rank: 4, seed: 3, tasks: 7, manifest: false), to: directory.file("all"))
        let base = directory.file("base")
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        for e in 0..<6 { try FileManager.default.copyItem(atPath: directory.file("all/expert\(e)"), toPath: base + "/expert\(e)") }
        let library = try ExpertLibrary.load(path: base)
        let runtime = try Runtime(library: library, options: RuntimeOptions(routing: RoutingOptions(topK: 2), workers: 1, maxQueuedCalls: 1000))
        defer { runtime.shutdown() }
        let layer = runtime.layer(named: "encoder.block.0.layer.0.SelfAttention.q")!
        let x = randomFloats(64 * 32, seed: 12)
        let before = try runtime.apply(layer, input: x, tokens: 64)

        let withSeventh = try ExpertLibrary.load(path: directory.file("all"))
        let afterAdd = try singleThreaded(withSeventh, module: layer.name, options: RoutingOptions(topK: 2), x: x, tokens: 64)
        #expect(afterAdd.delta != before.delta, "the added expert changes routing, so a mixture would be visible")

        // Callers run without pause while experts come and go. Each completed call is counted by which library it
        // saw (0: the 6 experts, 1: with the seventh); anything else is a mixture and counts as bad.
        let bad = Atomic<Int>(0), seen = Locked<[Int]>([0, 0])
        let callers = DispatchGroup()
        let stop = Atomic<Bool>(false)
        for _ in 0..<3 {
            DispatchQueue.global().async(group: callers) {
                while !stop.load(ordering: .relaxed) {
                    guard let got = try? runtime.apply(layer, input: x, tokens: 64) else { bad.add(1, ordering: .relaxed); continue }
                    if got.delta == before.delta { seen.withLock { $0[0] += 1 } }
                    else if got.delta == afterAdd.delta { seen.withLock { $0[1] += 1 } }
                    else { bad.add(1, ordering: .relaxed) }
                }
            }
        }
        /// Waits until callers have completed `calls` more calls that saw `state`: proof that calls ran on both
        /// sides of every change while the other callers kept going (bounded, so a stuck runtime fails the test).
        func awaitCalls(seeing state: Int, _ calls: Int = 3) -> Bool {
            let start = seen.withLock { $0[state] }
            let deadline = Date().addingTimeInterval(20)
            while seen.withLock({ $0[state] }) < start + calls {
                if Date() > deadline { return false }
                Thread.sleep(forTimeInterval: 0.001)
            }
            return true
        }
        #expect(awaitCalls(seeing: 0), "calls before any change")
        for cycle in 0..<5 {
            let index = try runtime.addExpert(directory: directory.file("all/expert6"), name: "expert6")
            #expect(index == ExpertIndex(6 + (runtime.library.experts.count - 7)))
            #expect(awaitCalls(seeing: 1), "cycle \(cycle): calls after adding the expert")
            try runtime.removeExpert(named: "expert6")
            #expect(awaitCalls(seeing: 0), "cycle \(cycle): calls after removing it")
        }
        try runtime.addExpert(directory: directory.file("all/expert6"), name: "expert6")
        #expect(awaitCalls(seeing: 1), "calls after the last change")
        stop.store(true, ordering: .relaxed)
        callers.wait()
        let counts = seen.withLock { $0 }
        #expect(counts[0] >= 18 && counts[1] >= 18, "calls seen per library: \(counts)")
        #expect(bad.load(ordering: .relaxed) == 0, "no call saw a half-updated library")
        // The last added expert has index 11 (indices are never reused) but routes like expert 6 of the 7-expert library.
        let final = try runtime.apply(layer, input: x, tokens: 64)
        #expect(final.delta == afterAdd.delta)
        #expect(Set(final.experts).isSubset(of: [0, 1, 2, 3, 4, 5, 11]))
        let inUse = #expect(throws: RuntimeError.self) { try runtime.addExpert(directory: directory.file("all/expert6"), name: "expert6") }
        #expect(inUse?.code == .library && inUse?.message == "expert \"expert6\": expected a new name, found one already served")
        try runtime.removeExpert(named: "expert6")
        #expect(try runtime.apply(layer, input: x, tokens: 64).delta == before.delta)
        let gone = #expect(throws: RuntimeError.self) { try runtime.removeExpert(named: "expert6") }
        #expect(gone?.code == .notFound && gone?.message == "expert \"expert6\": expected an expert being served, found none of that name")
    }

    @Test("non-finite input rows are left unrouted, the others applied, and the call then throws .nonFiniteInput",
          arguments: [RouterKind.phatgoose, .arrow, .uniform])
    func nonFiniteRows(_ router: RouterKind) throws {
        let library = try synthLibrary()
        let runtime = try Runtime(library: library, options: RuntimeOptions(routing: RoutingOptions(router: router, topK: 2), workers: 1))
        defer { runtime.shutdown() }
        let module = library.modules[0]
        let layer = runtime.layer(named: module.name)!
        let tokens = 40, slots = try runtime.slots(of: layer)
        let x = randomFloats(tokens * module.inWidth, seed: 14)
        var bad = x
        bad[3 * module.inWidth + 1] = .nan
        bad[30 * module.inWidth] = .infinity
        let clean = try runtime.apply(layer, input: x, tokens: tokens)
        var out = [Float](repeating: 0, count: tokens * module.outWidth)
        var experts = [Int32](repeating: 7, count: tokens * slots), weights = [Float](repeating: 7, count: tokens * slots)
        let error = #expect(throws: RuntimeError.self) {
            try bad.withUnsafeBufferPointer { input in
                try out.withUnsafeMutableBufferPointer { output in
                    try experts.withUnsafeMutableBufferPointer { e in
                        try weights.withUnsafeMutableBufferPointer { w in
                            try runtime.apply(layer, input: input, tokens: tokens, output: output, experts: e, weights: w)
                        }
                    }
                }
            }
        }
        #expect(error?.code == .nonFiniteInput)
        #expect(error?.message.contains("found NaN or infinite values in the row (or sequence) of 2 of 40 tokens, the first token 3") == true)
        for t in 0..<tokens {
            let row = (t * module.outWidth)..<((t + 1) * module.outWidth), choices = (t * slots)..<((t + 1) * slots)
            if t == 3 || t == 30 {
                #expect(out[row].allSatisfy { $0 == 0 } && experts[choices].allSatisfy { $0 == -1 } && weights[choices].allSatisfy { $0.isNaN })
            } else {
                #expect(Array(out[row]) == Array(clean.delta[row]) && Array(experts[choices]) == Array(clean.experts[choices]), "token \(t)")
            }
        }
    }

    @Test("routing buffers with rows wider than the slots get each token's choices, then expert -1 and weight 0")
    func widerRoutingRows() throws {
        let library = try synthLibrary()
        let runtime = try Runtime(library: library, options: RuntimeOptions(routing: RoutingOptions(router: .uniform), workers: 1))
        defer { runtime.shutdown() }
        let module = library.modules[0]
        let layer = runtime.layer(named: module.name)!
        let tokens = 5, slots = try runtime.slots(of: layer), stride = slots + 2
        let x = randomFloats(tokens * module.inWidth, seed: 15)
        let exact = try runtime.apply(layer, input: x, tokens: tokens)
        var out = [Float](repeating: 0, count: tokens * module.outWidth)
        func apply(_ count: Int) throws -> ([Int32], [Float]) {
            var experts = [Int32](repeating: 7, count: count), weights = [Float](repeating: 7, count: count)
            try x.withUnsafeBufferPointer { input in
                try out.withUnsafeMutableBufferPointer { output in
                    try experts.withUnsafeMutableBufferPointer { e in
                        try weights.withUnsafeMutableBufferPointer { w in
                            try runtime.apply(layer, input: input, tokens: tokens, output: output, experts: e, weights: w)
                        }
                    }
                }
            }
            return (experts, weights)
        }
        let (experts, weights) = try apply(tokens * stride)
        for t in 0..<tokens {
            #expect(Array(experts[(t * stride)..<(t * stride + slots)]) == Array(exact.experts[(t * slots)..<((t + 1) * slots)]))
            #expect(Array(weights[(t * stride)..<(t * stride + slots)]) == Array(exact.weights[(t * slots)..<((t + 1) * slots)]))
            #expect(experts[(t * stride + slots)..<((t + 1) * stride)].allSatisfy { $0 == -1 })
            #expect(weights[(t * stride + slots)..<((t + 1) * stride)].allSatisfy { $0 == 0 })
        }
        for count in [tokens * slots - 1, tokens * stride + 1] {
            let error = #expect(throws: RuntimeError.self) { _ = try apply(count) }
            #expect(error?.code == .shape && error?.message.contains("expected routing buffers of 5 x \(slots) entries") == true, "\(count) entries")
        }
    }

    @Test("a memory cap below the library's weights is refused with a clear error")
    func memoryCap() throws {
        let library = try synthLibrary()
        do {
            _ = try Runtime(library: library, options: RuntimeOptions(workers: 0, memoryCapBytes: 1000))
            Issue.record("expected a memory-cap error")
        } catch let error as RuntimeError {
            #expect(error.code == .memoryCap)
            #expect(error.message.contains("expected at most 1000 bytes"))
        }
        let fits = try Runtime(library: library, options: RuntimeOptions(workers: 0, memoryCapBytes: 100 << 20))
        #expect(fits.residentBytes > 0)
    }

    @Test("the observer sees routing, plan, every item, combine and the call; statistics add up")
    func observerAndStatistics() throws {
        let library = try synthLibrary()
        let recorder = RecordingObserver()
        let runtime = try Runtime(library: library, options: RuntimeOptions(routing: RoutingOptions(topK: 2), workers: 1, tileRows: 4, observer: recorder))
        defer { runtime.shutdown() }
        let layer = runtime.layer(named: library.modules[0].name)!
        _ = try runtime.apply(layer, input: randomFloats(50 * 64, seed: 13), tokens: 50)
        let events = recorder.events.withLock { $0 }
        let kinds = Set(events.map(\.kind))
        #expect(kinds.isSuperset(of: [.queued, .routing, .plan, .item, .combine, .call]))
        #expect(events.filter { $0.kind == .item || $0.kind == .steal }.reduce(0) { $0 + $1.rows } == 100)
        #expect(events.filter { $0.kind == .routing }.reduce(0) { $0 + $1.rows } == 50)
        #expect(events.allSatisfy { $0.end >= $0.start })
        let stats = runtime.statisticsSnapshot()
        #expect(stats.calls == 1 && stats.tokens == 50 && stats.tokensPerExpert.reduce(0, +) == 100)
    }

    @Test("calls below parallelMinTokens run on the caller alone (no worker, no combine), with the same bits; bad spin and threshold values are refused")
    func parallelMinTokens() throws {
        let library = try synthLibrary()
        let recorder = RecordingObserver()
        let runtime = try Runtime(library: library, options: RuntimeOptions(routing: RoutingOptions(topK: 2), workers: 1, tileRows: 2,
                                                                            spinMicroseconds: 0, parallelMinTokens: 16, contendedMinTokens: 0,
                                                                            observer: recorder))
        defer { runtime.shutdown() }
        let module = library.modules[0]
        let layer = runtime.layer(named: module.name)!
        for tokens in [8, 15, 16, 40] {
            recorder.events.withLock { $0.removeAll() }
            let x = randomFloats(tokens * module.inWidth, seed: UInt64(tokens) + 50)
            let got = try runtime.apply(layer, input: x, tokens: tokens)
            let expected = try singleThreaded(library, module: module.name, options: RoutingOptions(topK: 2), x: x, tokens: tokens)
            #expect(got.delta == expected.delta && got.experts == expected.experts, "T=\(tokens)")
            let events = recorder.events.withLock { $0 }
            let alone = events.allSatisfy { $0.worker == 0 } && !events.contains { $0.kind == .combine }
            // Tiles of 2 rows give every expert phase several items, so a call that may fan out has a combine phase.
            #expect(alone == (tokens < 16), "T=\(tokens): \(Set(events.map(\.kind)))")
        }
        // Input and output sharing memory are refused (the experts read the input while adding into the output).
        var shared = randomFloats(8 * max(module.inWidth, module.outWidth) + 8, seed: 60)
        #expect {
            try shared.withUnsafeMutableBufferPointer { buffer in
                try runtime.apply(layer, input: UnsafeBufferPointer(rebasing: buffer[0..<(8 * module.inWidth)]), tokens: 8,
                                  output: UnsafeMutableBufferPointer(rebasing: buffer[8..<(8 + 8 * module.outWidth)]))
            }
        } throws: { error in
            (error as? RuntimeError)?.code == .shape && "\(error)".contains("does not overlap the input")
        }
        #expect {
            _ = try Runtime(library: library, options: RuntimeOptions(workers: 1, contendedMinTokens: -1))
        } throws: { error in
            (error as? RuntimeError)?.code == .option && "\(error)".contains("contended min tokens: expected 0 (off) or more, found -1")
        }
        for (spin, threshold, message) in [(-1, 1, "spin microseconds"), (1_000_001, 1, "spin microseconds"), (50, 0, "parallel min tokens")] {
            #expect {
                _ = try Runtime(library: library, options: RuntimeOptions(workers: 1, spinMicroseconds: spin, parallelMinTokens: threshold))
            } throws: { error in
                (error as? RuntimeError)?.code == .option && "\(error)".contains(message)
            }
        }
    }

    @Test("after shutdown, calls fail with .shutDown")
    func shutdown() throws {
        let library = try synthLibrary()
        let runtime = try Runtime(library: library, options: RuntimeOptions(workers: 1))
        let layer = runtime.layer(named: library.modules[0].name)!
        runtime.shutdown()
        runtime.shutdown()
        let error = #expect(throws: RuntimeError.self) { _ = try runtime.apply(layer, input: randomFloats(64, seed: 1), tokens: 1) }
        #expect(error?.code == .shutDown && error?.message == "runtime: expected a running runtime, found it shut down")
    }

    @Test("placement on a modelled 2-node topology: distribute balances, isolate uses one node, replicate copies hot experts")
    func placement() throws {
        let topology = try Topology.modelled("0;1")
        #expect(topology.nodes.map(\.cpus) == [[0], [1]])
        let bytes = [100, 100, 50, 50, 0, 200]
        let distribute = try PlacementPlan.make(policy: .distribute, topology: topology, bytes: bytes, load: nil)
        // Longest first: 200 -> node 0, 100 -> node 1, 100 -> node 1, 50 -> node 0 (tie, lower node), 50 -> node 1.
        #expect(distribute.nodes == [[1], [1], [0], [1], [], [0]])
        let isolate = try PlacementPlan.make(policy: .isolate(node: 1), topology: topology, bytes: bytes, load: nil)
        #expect(isolate.nodes == [[1], [1], [1], [1], [], [1]])
        let replicate = try PlacementPlan.make(policy: .replicateHot(count: 1), topology: topology, bytes: bytes, load: [0.1, 0.5, 0.1, 0.1, 0, 0.2])
        #expect(replicate.nodes[1] == [0, 1] && replicate.nodes.filter { $0.count == 2 }.count == 1)
        let noNode = #expect(throws: RuntimeError.self) { _ = try PlacementPlan.make(policy: .isolate(node: 2), topology: topology, bytes: bytes, load: nil) }
        #expect(noNode?.code == .option && noNode?.message == "placement isolate: expected a node in 0..<2, found 2")

        let library = try synthLibrary()
        let runtime = try Runtime(library: library, options: RuntimeOptions(workers: 1, topology: topology))
        defer { runtime.shutdown() }
        #expect(runtime.participantNodes == [0, 1])
        #expect(runtime.participantCPUs == [nil, 1])
        let report = runtime.placementReport()
        #expect(report.map(\.node) == [0, 1])
        #expect(report.allSatisfy { $0.bytes > 0 && !$0.experts.isEmpty })
        // On this machine both modelled nodes bind memory to its one real node; the kernel must report the pages there.
        for shard in report where Topology.canBindMemory {
            #expect(shard.pagesByNode.keys.sorted() == [shard.memoryNode], "pages of node \(shard.node): \(shard.pagesByNode)")
        }
    }

    @Test("topology specs are validated")
    func topologySpecs() {
        for (spec, message) in [("0;x", "topology \"0;x\": node 1: expected CPU lists like 0-3,6, found \"x\""),
                                ("0;;1", "topology \"0;;1\": node 1: expected at least one CPU, found none"),
                                ("0;4096", "topology \"0;4096\": node 1: expected CPUs this process may use")] {
            let error = #expect(throws: RuntimeError.self) { _ = try Topology.modelled(spec) }
            #expect(error?.code == .option && error?.message.hasPrefix(message) == true, "\(spec): \(String(describing: error))")
        }
        #expect(Topology.detect().cpuCount == Topology.allowedCPUs().count)
    }
}
