import Testing
@testable import PhatgooseDistributed
import PhatgooseLibrary
import PhatgooseRouting

/// The distributed runtime's parts that need no MPI world: placement over ranks, each rank's copies, and a call
/// split over ranks, encoded, run by each rank's shard and decoded, against the single-process executor. The
/// MPI exchange itself runs in CI under mpirun (scripts/check-mpi.sh).
@Suite("distributed runtime (without MPI)")
struct DistributedTests {
    @Test("placement balances bytes or load over the ranks, replicates the hottest on every rank, and refuses bad loads")
    func placement() throws {
        let bytes = [10, 9, 8, 7, 1, 1, 0]
        let plan = try RankPlacement.make(rankCount: 2, bytes: bytes, load: nil, replicateHot: 0)
        // LPT: 10 -> 0, 9 -> 1, 8 -> 1 (9 < 10), 7 -> 0, 1 -> 0 or 1 by the lower sum...; an expert without weights nowhere.
        let perRank = (0..<2).map { r in plan.experts(of: r).reduce(0) { $0 + bytes[$1] } }
        #expect(perRank.reduce(0, +) == 36)
        #expect(abs(perRank[0] - perRank[1]) <= 1, "\(perRank)")
        #expect(plan.ranks[6].isEmpty)
        #expect(plan.ranks.prefix(6).allSatisfy { $0.count == 1 })
        // By load: the expert with most tokens goes alone once its load outweighs the rest.
        let byLoad = try RankPlacement.make(rankCount: 2, bytes: bytes, load: [0.1, 0.1, 0.1, 0.1, 0.5, 0.1, 0], replicateHot: 0)
        #expect(byLoad.experts(of: byLoad.ranks[4][0]) == [4])
        let replicated = try RankPlacement.make(rankCount: 3, bytes: bytes, load: nil, replicateHot: 2)
        #expect(replicated.ranks[0] == [0, 1, 2] && replicated.ranks[1] == [0, 1, 2] && replicated.ranks[2].count == 1)
        let short = #expect(throws: DistributedError.self) { _ = try RankPlacement.make(rankCount: 2, bytes: bytes, load: [1, 2], replicateHot: 0) }
        #expect(short?.code == .option && short?.message.contains("expected one value per expert (7), found 2") == true)
        let negative = #expect(throws: DistributedError.self) {
            _ = try RankPlacement.make(rankCount: 2, bytes: bytes, load: [1, 1, 1, -1, 1, 1, 1], replicateHot: 0)
        }
        #expect(negative?.message.contains("found -1.0 for expert 3") == true)
        #expect(throws: DistributedError.self) { _ = try RankPlacement.make(rankCount: 0, bytes: bytes, load: nil, replicateHot: 0) }
    }

    @Test("a call split over 3 ranks (one expert replicated), encoded, run by each rank's copies and decoded, gets the single-process bits",
          arguments: [(RouterKind.phatgoose, 2), (.arrow, 3)])
    func callOverRanksKeepsBits(router: RouterKind, topK: Int) throws {
        let library = try synthLibrary(experts: 10, coverage: 0.8, seed: 9)
        let placement = try RankPlacement.make(rankCount: 3, bytes: ExpertShard.expertBytes(library), load: nil, replicateHot: 1)
        let shards = try (0..<3).map { r in try ExpertShard(library: library, held: Set(placement.experts(of: r)), memoryCap: nil, who: "rank \(r)") }
        #expect(shards.reduce(0) { $0 + $1.residentBytes } > ExpertShard.expertBytes(library).reduce(0, +), "the replica is held three times")
        let widths = library.modules.map { (inWidth: $0.inWidth, outWidth: $0.outWidth) }
        let h = ScratchBuffer()
        var segments = [[CallCodec.Segment]](repeating: [], count: 3)
        var order: [Int32] = []
        for (m, module) in library.modules.enumerated() {
            let router = try LayerRouter(module: module, options: RoutingOptions(router: router, topK: topK))
            let holders = module.experts.map { placement.ranks[$0.expert.int] }
            for tokens in [1, 7, 40] {
                let x = randomFloats(tokens * module.inWidth, seed: UInt64(100 * m + tokens))
                let reference = LayerExecutor()
                var expected = [Float](repeating: 0, count: tokens * module.outWidth)
                reference.apply(module, router: router, x: x, ldx: module.inWidth, tokens: tokens, out: &expected, ldo: module.outWidth)
                var plan = DispatchPlan()
                plan.build(from: reference.routing, candidates: module.experts.count)
                try CallCodec.split(plan, holders: holders, module: module.name, into: &segments)
                #expect(segments.reduce(0) { $0 + $1.reduce(0) { $0 + $1.count } } == plan.assignmentCount)
                var rows = [Float](repeating: .nan, count: max(1, plan.assignmentCount * module.outWidth))
                var localToken = [Int32](repeating: -1, count: tokens)
                for rank in 0..<3 where !segments[rank].isEmpty {
                    let message = MessageBuffer(), answer = MessageBuffer()
                    let n = plan.tokens.withUnsafeBufferPointer { t in
                        plan.weights.withUnsafeBufferPointer { w in
                            CallCodec.encodeCall(segments[rank], module: m, callID: 7, planTokens: t.baseAddress!, planWeights: w.baseAddress!,
                                                 x: x, inWidth: module.inWidth, localToken: &localToken, order: &order, into: message)
                        }
                    }
                    #expect(localToken.allSatisfy { $0 == -1 })
                    var reader = MessageReader(message.pointer, count: message.count, what: "call")
                    #expect(try reader.read(Int32.self) == Wire.Kind.call.rawValue)
                    #expect(ExpertServer.answerCall(&reader, shard: shards[rank], widths: widths, h: h, rank: rank, into: answer) == n)
                    var rowsReader = MessageReader(answer.pointer, count: answer.count, what: "rows")
                    try rows.withUnsafeMutableBufferPointer { out in
                        try CallCodec.decodeRows(&rowsReader, callID: 7, segments: segments[rank], outWidth: module.outWidth, into: out.baseAddress!)
                    }
                }
                var got = [Float](repeating: 0, count: tokens * module.outWidth)
                LayerExecutor.combine(plan, rows: rows, outWidth: module.outWidth, tokenRange: 0..<tokens, out: &got, ldo: module.outWidth)
                let same = got.map(\.bitPattern) == expected.map(\.bitPattern)
                #expect(same, "module \(module.name), \(tokens) tokens: the delta differs from the single-process one")
            }
        }
    }

    @Test("a rank refuses a share over the memory cap; bad calls and answers are errors naming what was wrong")
    func capsAndMalformedMessages() throws {
        let library = try synthLibrary(experts: 6, coverage: 1, seed: 3)
        let bytes = ExpertShard.expertBytes(library)
        let capped = #expect(throws: DistributedError.self) {
            _ = try ExpertShard(library: library, held: [0, 1], memoryCap: bytes[0] + bytes[1] - 1, who: "rank 2")
        }
        #expect(capped?.code == .memoryCap && capped?.message.contains("rank 2: memory cap: expected at most \(bytes[0] + bytes[1] - 1) bytes") == true)
        let shard = try ExpertShard(library: library, held: [0], memoryCap: bytes[0], who: "rank 1")
        #expect(shard.residentBytes == bytes[0] && shard.expertCount == 1)
        let widths = library.modules.map { (inWidth: $0.inWidth, outWidth: $0.outWidth) }
        let module = library.modules[0]
        let c = try #require(module.candidateSlot(of: ExpertIndex(1)))
        // A call for an expert this rank does not hold: answered with a failure naming the candidate.
        let message = MessageBuffer(), answer = MessageBuffer()
        var localToken: [Int32] = [-1], order: [Int32] = []
        let x = randomFloats(module.inWidth, seed: 1)
        var token: Int32 = 0
        var weight: Float = 1
        _ = CallCodec.encodeCall([(0, 1, c)], module: 0, callID: 3, planTokens: &token, planWeights: &weight, x: x, inWidth: module.inWidth,
                                 localToken: &localToken, order: &order, into: message)
        var reader = MessageReader(message.pointer + 4, count: message.count - 4, what: "call")
        #expect(ExpertServer.answerCall(&reader, shard: shard, widths: widths, h: ScratchBuffer(), rank: 1, into: answer) == -1)
        var rows = [Float](repeating: 0, count: module.outWidth)
        var failed = MessageReader(answer.pointer, count: answer.count, what: "rank 1's rows")
        let refused = #expect(throws: DistributedError.self) {
            try CallCodec.decodeRows(&failed, callID: 3, segments: [(0, 1, c)], outWidth: module.outWidth, into: &rows)
        }
        #expect(refused?.code == .rank && refused?.message.contains("expected a candidate this rank holds, found candidate \(c)") == true)
        // A truncated call: the failure names the bytes expected.
        var short = MessageReader(message.pointer + 4, count: 20, what: "call")
        #expect(ExpertServer.answerCall(&short, shard: shard, widths: widths, h: ScratchBuffer(), rank: 1, into: answer) == -1)
        #expect(String(decoding: UnsafeRawBufferPointer(start: answer.pointer + 24, count: answer.count - 24), as: UTF8.self).contains("expected at least"))
        // An answer to another call.
        let c0 = try #require(module.candidateSlot(of: ExpertIndex(0)))
        _ = CallCodec.encodeCall([(0, 1, c0)], module: 0, callID: 4, planTokens: &token, planWeights: &weight, x: x, inWidth: module.inWidth,
                                 localToken: &localToken, order: &order, into: message)
        var good = MessageReader(message.pointer + 4, count: message.count - 4, what: "call")
        #expect(ExpertServer.answerCall(&good, shard: shard, widths: widths, h: ScratchBuffer(), rank: 1, into: answer) == 1)
        var other = MessageReader(answer.pointer, count: answer.count, what: "rank 1's rows")
        let mismatch = #expect(throws: DistributedError.self) {
            try CallCodec.decodeRows(&other, callID: 5, segments: [(0, 1, c0)], outWidth: module.outWidth, into: &rows)
        }
        #expect(mismatch?.code == .shape && mismatch?.message.contains("of call 5, found kind 4 of call 4") == true)
    }

    @Test("the library fingerprint tells libraries apart by names and shapes")
    func fingerprint() throws {
        let a = try synthLibrary(experts: 6, coverage: 1, seed: 3), b = try synthLibrary(experts: 6, coverage: 1, seed: 4), c = try synthLibrary(experts: 7, coverage: 1, seed: 3)
        #expect(a.shardFingerprint == b.shardFingerprint, "same names and shapes, other values")
        #expect(a.shardFingerprint != c.shardFingerprint)
        #expect(MPIWorld.isAvailable || (try? MPIWorld.initialize()) == nil)
    }
}
