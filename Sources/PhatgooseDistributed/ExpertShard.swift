import PhatgooseKernels
import PhatgooseLibrary
import PhatgooseRouting

/// Where each expert's weights live in an MPI world: the ranks holding it (more than one when replicated).
public struct RankPlacement: Sendable, Equatable {
    /// `ranks[e]`: the ranks holding expert e, ascending. Empty for an expert with no weights.
    public var ranks: [[Int]]

    /// Spreads the experts over `rankCount` ranks, longest processing time first: the costliest expert goes to the
    /// rank with the least cost so far (ties to the lower rank). The cost is `load[e]` (a measured share of tokens)
    /// when given, else `bytes[e]`. The `replicateHot` costliest experts are then held by every rank.
    public static func make(rankCount: Int, bytes: [Int], load: [Double]?, replicateHot: Int) throws(DistributedError) -> RankPlacement {
        guard rankCount >= 1 else { throw DistributedError(.option, "ranks: expected at least 1, found \(rankCount)") }
        guard replicateHot >= 0 else { throw DistributedError(.option, "replicate hot: expected a count >= 0, found \(replicateHot)") }
        if let load {
            guard load.count == bytes.count else {
                throw DistributedError(.option, "expert load: expected one value per expert (\(bytes.count)), found \(load.count)")
            }
            if let bad = load.firstIndex(where: { !$0.isFinite || $0 < 0 }) {
                throw DistributedError(.option, "expert load: expected finite values >= 0, found \(load[bad]) for expert \(bad)")
            }
        }
        let cost: [Double] = load ?? bytes.map(Double.init)
        var ranks = [[Int]](repeating: [], count: bytes.count)
        var perRank = [Double](repeating: 0, count: rankCount)
        let order = bytes.indices.filter { bytes[$0] > 0 }.sorted { cost[$0] > cost[$1] || (cost[$0] == cost[$1] && $0 < $1) }
        for e in order {
            let rank = perRank.indices.min { perRank[$0] < perRank[$1] || (perRank[$0] == perRank[$1] && $0 < $1) }!
            ranks[e] = [rank]
            perRank[rank] += cost[e]
        }
        for e in order.prefix(replicateHot) { ranks[e] = Array(0..<rankCount) }
        return RankPlacement(ranks: ranks)
    }

    /// The experts rank `rank` holds.
    public func experts(of rank: Int) -> [Int] { ranks.indices.filter { ranks[$0].contains(rank) } }
}

/// The expert weights one rank holds: its own copies of `lora_A` and `lora_B`ᵀ of each expert placed on it, at every
/// module, so the rank's memory holds its share and nothing more (the library it was loaded from can go).
///
/// # Thread safety
/// Immutable after `init`.
final class ExpertShard: @unchecked Sendable {
    /// `views[m][c]`: module m's candidate c, when this rank holds it.
    let views: [[ExpertKernelView?]]
    /// Keeps the copies alive.
    private let buffers: [HeapBuffer]
    /// Bytes of the copies.
    let residentBytes: Int
    /// Experts held.
    let expertCount: Int

    /// Bytes of `lora_A` and `lora_B` of each expert of `library`, over all modules.
    static func expertBytes(_ library: ExpertLibrary) -> [Int] {
        var bytes = [Int](repeating: 0, count: library.experts.count)
        for module in library.modules {
            for piece in module.experts where piece.expert.int < bytes.count {
                bytes[piece.expert.int] += piece.a.byteCount + piece.bTransposed.byteCount
            }
        }
        return bytes
    }

    /// Copies the experts `held` (expert indices) of `library`; throws `.memoryCap` before copying anything when
    /// they exceed `memoryCap` bytes. `who` names the rank in the message.
    init(library: ExpertLibrary, held: Set<Int>, memoryCap: Int?, who: String) throws(DistributedError) {
        let bytes = Self.expertBytes(library)
        let needed = held.reduce(0) { $0 + ($1 < bytes.count ? bytes[$1] : 0) }
        if let memoryCap, needed > memoryCap {
            throw DistributedError(.memoryCap, "\(who): memory cap: expected at most \(memoryCap) bytes of expert weights, found \(needed) needed for its \(held.count) of \(library.experts.count) experts")
        }
        var buffers: [HeapBuffer] = []
        var views: [[ExpertKernelView?]] = []
        for module in library.modules {
            var row: [ExpertKernelView?] = []
            for piece in module.experts {
                guard held.contains(piece.expert.int) else {
                    row.append(nil)
                    continue
                }
                let a = HeapBuffer(byteCount: piece.a.byteCount)
                a.pointer.copyMemory(from: piece.a.pointer, byteCount: piece.a.byteCount)
                let b = HeapBuffer(byteCount: piece.bTransposed.byteCount)
                b.pointer.copyMemory(from: piece.bTransposed.pointer, byteCount: piece.bTransposed.byteCount)
                var view = ExpertKernelView(piece)
                view.a = UnsafeRawPointer(a.pointer)
                view.bTransposed = UnsafeRawPointer(b.pointer)
                buffers += [a, b]
                row.append(view)
            }
            views.append(row)
        }
        self.views = views
        self.buffers = buffers
        residentBytes = needed
        expertCount = held.count
    }

    /// Runs `count` assignments of module `module` sorted by candidate: for each, the expert's expanded row
    /// `w * scale * B (A x)` into `rows` (`outWidth` apart), the bits a single process computes. `x` holds the
    /// rows the assignments' `tokens` index. Throws `.shape` for a candidate this rank does not hold.
    func run(module: Int, inWidth: Int, outWidth: Int, candidates: UnsafePointer<Int32>, tokens: UnsafePointer<Int32>,
             weights: UnsafePointer<Float>, count: Int, x: UnsafePointer<Float>, h: ScratchBuffer,
             rows: UnsafeMutablePointer<Float>) throws(DistributedError) {
        let row = views[module]
        var start = 0
        while start < count {
            let c = Int(candidates[start])
            var end = start + 1
            while end < count && candidates[end] == candidates[start] { end += 1 }
            guard c >= 0 && c < row.count, let view = row[c] else {
                throw DistributedError(.shape, "module \(module): expected a candidate this rank holds, found candidate \(c)")
            }
            let scratch = h.reserve((end - start) * view.rank)
            LayerExecutor.runExpert(view, x: x, ldx: inWidth, inWidth: inWidth, outWidth: outWidth, tokens: tokens + start,
                                    weights: weights + start, count: end - start, h: scratch, rows: rows + start * outWidth)
            start = end
        }
    }
}
