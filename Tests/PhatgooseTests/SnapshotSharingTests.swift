import Dispatch
import Foundation
import PhatgooseLibrary
import PhatgooseRouting
@testable import PhatgooseRuntime
import PhatgooseSynth
import Testing

/// Seven synthetic experts over three layer shapes on disk: `all` holds the seven, `base` the first six, and
/// `all/expert6` is the directory an added expert comes from.
struct LiveChangeFixture {
    let directory = TemporaryDirectory()
    let base: ExpertLibrary
    let withSeventh: ExpertLibrary
    var seventh: String { directory.file("all/expert6") }

    init() throws {
        let shape = ModelShape(name: "t", layers: [
            .init(name: "encoder.block.0.layer.0.SelfAttention.q", inWidth: 32, outWidth: 32),
            .init(name: "encoder.block.0.layer.0.SelfAttention.k", inWidth: 32, outWidth: 24),
            .init(name: "encoder.block.0.layer.1.DenseReluDense.wo", inWidth: 48, outWidth: 32),
        ])
        try Synth.writeLibrary(SynthOptions(shape: shape, experts: 7, rank: 4, seed: 9, tasks: 7, coverage: 0.8, manifest: false),
                               to: directory.file("all"))
        let basePath = directory.file("base")
        try FileManager.default.createDirectory(atPath: basePath, withIntermediateDirectories: true)
        for e in 0..<6 { try FileManager.default.copyItem(atPath: directory.file("all/expert\(e)"), toPath: basePath + "/expert\(e)") }
        base = try ExpertLibrary.load(path: basePath)
        withSeventh = try ExpertLibrary.load(path: directory.file("all"))
    }
}

/// Bytes of expert `e`'s weights (`lora_A` and transposed `lora_B` of every module it adapts): what one copy holds.
func expertBytes(_ library: ExpertLibrary, _ e: Int) -> Int {
    library.modules.reduce(0) { sum, module in
        sum + module.experts.filter { $0.expert.int == e }.reduce(0) { $0 + $1.a.byteCount + $1.bTransposed.byteCount }
    }
}

/// Waits (bounded) until `condition` holds: memory of an old snapshot is freed on whichever thread ends its last call.
func eventually(_ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(10)
    while !condition() {
        if Date() > deadline { return false }
        Thread.sleep(forTimeInterval: 0.001)
    }
    return true
}

@Suite("live changes share snapshots", .serialized)
struct SnapshotSharingTests {
    static let policies: [PlacementPolicy] = [.distribute, .replicateHot(count: 2), .isolate(node: 1), .inPlace]

    @Test("adding an expert copies only it: every other expert keeps its nodes and its memory, resident bytes grow by its bytes",
          arguments: policies)
    func addSharesUnchangedCopies(_ policy: PlacementPolicy) throws {
        let fixture = try LiveChangeFixture()
        let runtime = try Runtime(library: fixture.base, options: RuntimeOptions(
            routing: RoutingOptions(topK: 2), workers: 1, topology: try Topology.modelled("0;1"), placement: policy, oversubscribe: true))
        defer { runtime.shutdown() }
        let old = runtime.currentSnapshot
        let replicas = (0..<6).map { old.placement.nodes[$0].count }
        let start = (0..<6).reduce(0) { $0 + expertBytes(fixture.base, $1) * (policy == .inPlace ? 1 : replicas[$1]) }
        #expect(runtime.residentBytes == start && old.residentBytes == start)
        if case .replicateHot = policy { #expect(replicas.filter { $0 == 2 }.count == 2) }

        let index = try runtime.addExpert(directory: fixture.seventh, name: "expert6")
        let new = runtime.currentSnapshot
        #expect(index == ExpertIndex(6) && new !== old)
        for e in 0..<6 {
            #expect(new.placement.nodes[e] == old.placement.nodes[e], "expert \(e) keeps its nodes")
            #expect(new.expertCopies[e].count == old.expertCopies[e].count
                    && zip(new.expertCopies[e], old.expertCopies[e]).allSatisfy { $0.0 === $0.1 }, "expert \(e) keeps its copies")
            if policy != .inPlace {
                #expect(new.expertCopies[e].map { $0.arena!.base } == old.expertCopies[e].map { $0.arena!.base })
            }
        }
        // What the hot path reads: every unchanged candidate's tensors are the very same memory in both snapshots.
        for (m, module) in new.library.modules.enumerated() {
            guard let oldModule = old.library.moduleIndex(of: module.name) else { continue }
            for (c, piece) in module.experts.enumerated() where piece.expert.int < 6 {
                let before = old.copies[oldModule][old.library.modules[oldModule].experts.firstIndex { $0.expert == piece.expert }!]
                #expect(new.copies[m][c].pieces.map(\.a.pointer) == before.pieces.map(\.a.pointer), "\(module.name), expert \(piece.expert)")
                #expect(new.copies[m][c].pieces.map(\.bTransposed.pointer) == before.pieces.map(\.bTransposed.pointer))
            }
        }
        // Only the added expert was placed: on one node, the least loaded by bytes (ties to node 0), or the isolated one.
        var perNode = [0, 0]
        for e in 0..<6 { for node in old.placement.nodes[e] { perNode[node] += expertBytes(fixture.base, e) } }
        let expectedNode = policy == .isolate(node: 1) ? 1 : (perNode[1] < perNode[0] ? 1 : 0)
        #expect(new.placement.nodes[6] == [expectedNode], "per-node bytes before: \(perNode)")
        let added = expertBytes(fixture.withSeventh, 6)
        #expect(added > 0)
        // The old snapshot is still alive here (this test holds it), and costs nothing extra: all it has is shared.
        #expect(runtime.residentBytes == start + added)
        #expect(new.residentBytes == start + added)
        if policy != .inPlace {
            let report = runtime.placementReport()
            #expect(report.map(\.node) == [0, 1])
            #expect(report.reduce(0) { $0 + $1.bytes } >= start + added)
            #expect(report[expectedNode].experts.contains("expert6"))
        }
    }

    @Test("removing an expert frees its copies once no call holds the old snapshot", arguments: [PlacementPolicy.distribute, .replicateHot(count: 6)])
    func removeFreesOnceDrained(_ policy: PlacementPolicy) throws {
        let fixture = try LiveChangeFixture()
        let gate = GateObserver()
        let runtime = try Runtime(library: fixture.base, options: RuntimeOptions(
            routing: RoutingOptions(topK: 2), workers: 1, topology: try Topology.modelled("0;1"), placement: policy, oversubscribe: true,
            observer: gate))
        defer { runtime.shutdown() }
        let start = runtime.residentBytes
        let copies = runtime.currentSnapshot.placement.nodes[2].count
        let removed = expertBytes(fixture.base, 2) * copies
        #expect(removed > 0 && copies == (policy == .distribute ? 1 : 2))

        // Hold a call inside the runtime, on the snapshot that still has expert 2.
        let module = fixture.base.modules[0]
        let layer = runtime.layer(named: module.name)!
        let x = randomFloats(8 * module.inWidth, seed: 21)
        let held = DispatchGroup()
        DispatchQueue.global().async(group: held) { _ = try? runtime.apply(layer, input: x, tokens: 8) }
        gate.entered.wait()
        // A failed expectation below must not leave the call held (shutdown would wait for it).
        var released = false
        defer { if !released { gate.release.signal(); held.wait() } }
        try runtime.removeExpert(named: "expert2")
        #expect(runtime.currentSnapshot.expertCopies[2].isEmpty)
        #expect(runtime.currentSnapshot.residentBytes == start - removed)
        #expect(runtime.residentBytes == start, "the call in flight still holds expert 2's copies")

        gate.release.signal()
        held.wait()
        released = true
        #expect(eventually { runtime.residentBytes == start - removed }, "found \(runtime.residentBytes), expected \(start - removed)")
        #expect(runtime.residentBytes == start - removed)
    }

    @Test("the memory cap is checked against what is really held: a change that fits the new snapshot alone is refused while an old one is alive")
    func capCountsOldSnapshots() throws {
        let fixture = try LiveChangeFixture()
        let gate = GateObserver()
        let library = fixture.base
        let start = (0..<6).reduce(0) { $0 + expertBytes(library, $1) }
        let seventh = expertBytes(fixture.withSeventh, 6)
        let removed = expertBytes(library, 2)
        // Room for the six plus the seventh, less one byte: the seventh fits only once expert 2 is really freed.
        let cap = start + seventh - 1
        let runtime = try Runtime(library: library, options: RuntimeOptions(
            routing: RoutingOptions(topK: 2), workers: 1, topology: try Topology.modelled("0;1"), memoryCapBytes: cap, oversubscribe: true,
            observer: gate))
        defer { runtime.shutdown() }
        #expect(runtime.residentBytes == start)

        let module = library.modules[0]
        let layer = runtime.layer(named: module.name)!
        let x = randomFloats(8 * module.inWidth, seed: 22)
        let held = DispatchGroup()
        DispatchQueue.global().async(group: held) { _ = try? runtime.apply(layer, input: x, tokens: 8) }
        gate.entered.wait()
        // A failed expectation below must not leave the call held (shutdown would wait for it).
        var released = false
        defer { if !released { gate.release.signal(); held.wait() } }
        // Removing adds nothing, so it is never refused.
        try runtime.removeExpert(named: "expert2")
        let before = runtime.currentSnapshot
        #expect(before.residentBytes + seventh <= cap, "the new snapshot alone would fit")
        let error = #expect(throws: RuntimeError.self) { try runtime.addExpert(directory: fixture.seventh, name: "expert6") }
        #expect(error?.code == .memoryCap)
        #expect(error?.message == "memory cap: expected at most \(cap) bytes of expert weights, found \(start + seventh) needed for 6 experts: \(start) held (snapshots still serving calls included) plus \(seventh) to copy",
                "\(String(describing: error))")
        // Refused, changing nothing.
        #expect(runtime.currentSnapshot === before)
        #expect(runtime.library.experts.count == 6 && runtime.residentBytes == start)
        #expect(runtime.statisticsSnapshot().tokensPerExpert.count == 6)

        gate.release.signal()
        held.wait()
        released = true
        #expect(eventually { runtime.residentBytes == start - removed })
        let index = try runtime.addExpert(directory: fixture.seventh, name: "expert6")
        #expect(index == ExpertIndex(6))
        #expect(runtime.residentBytes == start - removed + seventh && runtime.residentBytes <= cap)
    }

    @Test("after adds and removes, every layer's result equals the single-threaded executor's bit for bit", arguments: policies)
    func bitsAfterChanges(_ policy: PlacementPolicy) throws {
        let fixture = try LiveChangeFixture()
        let routing = RoutingOptions(topK: 2)
        let runtime = try Runtime(library: fixture.base, options: RuntimeOptions(
            routing: routing, workers: 1, topology: try Topology.modelled("0;1"), placement: policy, tileRows: 3, oversubscribe: true))
        defer { runtime.shutdown() }
        func check(_ step: String, against reference: ExpertLibrary) throws {
            #expect(runtime.library.modules.map(\.name) == reference.modules.map(\.name), "\(step): modules")
            for module in reference.modules {
                for tokens in [1, 7, 40] {
                    let x = randomFloats(tokens * module.inWidth, seed: UInt64(tokens * 31 + module.inWidth))
                    let expected = try singleThreaded(reference, module: module.name, options: routing, x: x, tokens: tokens)
                    let got = try runtime.apply(runtime.layer(named: module.name)!, input: x, tokens: tokens)
                    #expect(got.delta == expected.delta && got.experts == expected.experts && got.weights == expected.weights,
                            "\(step), \(module.name), T=\(tokens)")
                }
            }
        }
        try check("start", against: fixture.base)
        try runtime.addExpert(directory: fixture.seventh, name: "expert6")
        try check("after adding expert6", against: fixture.withSeventh)
        try runtime.removeExpert(named: "expert2")
        // The reference executor runs on the runtime's library (the library's own tensors), the runtime on its copies.
        try check("after removing expert2", against: runtime.library)
        try runtime.removeExpert(named: "expert6")
        try check("after removing expert6", against: runtime.library)
        try runtime.addExpert(directory: fixture.seventh, name: "expert6")
        try check("after adding expert6 again", against: runtime.library)
        #expect(runtime.currentSnapshot.expertCopies[6].isEmpty && !runtime.currentSnapshot.expertCopies[7].isEmpty)
    }
}
