import Foundation
import PhatgooseKernels
import PhatgooseLibrary
import PhatgooseRouting

/// The loop of a rank other than 0: it waits for rank 0's hello, loads its share of the experts, then runs the
/// assignments rank 0 sends it until told to stop.
public enum ExpertServer {
    /// What a server did, for its report.
    public struct Summary: Sendable {
        /// Calls served.
        public var calls = 0
        /// Assignments run.
        public var assignments = 0
        /// Bytes of expert weights held.
        public var residentBytes = 0
        /// Experts held.
        public var experts = 0
    }

    /// Serves rank 0 of `world` from the library `load` returns when rank 0's hello arrives (or, when it throws,
    /// answers the hello with that failure so rank 0 reports it) until rank 0 says stop. The library is let go once
    /// this rank's share is copied, so the rank holds its share and nothing more. `memoryCapBytes` caps this rank's share (rank 0's cap applies
    /// too). Throws when rank 0's messages are malformed or MPI fails; a rank-0 that goes away ends the whole job
    /// (the launcher's doing), so the loop needs no timeout of its own.
    public static func serve(world: MPIWorld, memoryCapBytes: Int? = nil, load: () throws -> ExpertLibrary) throws(DistributedError) -> Summary {
        guard world.rank != 0 else {
            throw DistributedError(.option, "serve experts: expected a rank other than 0, found rank 0 (rank 0 is the host that routes: run the host command there, e.g. mpirun -np 1 phatgoose apply --mpi ... : -np 3 phatgoose serve-experts ...)")
        }
        var helloSeen = false
        let inbox = MessageBuffer(capacity: 1 << 16)
        let outbox = MessageBuffer(capacity: 1 << 16)
        let answer = PendingMessage()
        var summary = Summary()
        var shard: ExpertShard?
        var widths: [(inWidth: Int, outWidth: Int)] = []
        var backoff = Backoff()
        let h = ScratchBuffer()
        let lastAnswerTimeout: UInt64 = 60_000_000_000

        while true {
            guard let size = try world.probe(from: 0, tag: Wire.commandTag) else {
                backoff.pause()
                continue
            }
            backoff.reset()
            // The previous answer must be delivered before its buffer is reused.
            try world.wait([answer], timeoutNanos: lastAnswerTimeout, context: { "delivering rows to rank 0" })
            inbox.reset()
            inbox.reserve(size)
            let receive = PendingMessage()
            try world.receive(inbox.pointer, capacity: inbox.capacity, from: 0, tag: Wire.commandTag, into: receive)
            try world.wait([receive], timeoutNanos: lastAnswerTimeout, context: { "receiving a command from rank 0" })
            var reader = MessageReader(inbox.pointer, count: receive.received, what: "rank \(world.rank): a message from rank 0")
            let kind = try reader.read(Int32.self)
            switch Wire.Kind(rawValue: kind) {
            case .stop:
                return summary
            case .hello:
                outbox.reset()
                outbox.append(Wire.Kind.ready.rawValue)
                do throws(DistributedError) {
                    // Loaded now, not before the hello: rank 0 may be generating the library until then.
                    guard !helloSeen else { throw DistributedError(.rank, "rank \(world.rank): a second hello") }
                    helloSeen = true
                    let loaded: ExpertLibrary
                    do { loaded = try load() } catch { throw DistributedError(.rank, "rank \(world.rank): \(String(describing: error))") }
                    let made = try hello(&reader, library: loaded, world: world, memoryCap: memoryCapBytes)
                    shard = made
                    widths = loaded.modules.map { ($0.inWidth, $0.outWidth) }
                    summary.residentBytes = made.residentBytes
                    summary.experts = made.expertCount
                    outbox.append(Int32(0))
                    outbox.append(Int64(made.residentBytes))
                    outbox.append(Int32(made.expertCount))
                    outbox.append(Int64(ProcessInfo.residentSetBytes()))
                } catch {
                    outbox.append(Int32(1))
                    outbox.append(Int64(0))
                    outbox.append(Int32(0))
                    outbox.append(Int64(ProcessInfo.residentSetBytes()))
                    outbox.append(error.message)
                }
                try world.send(outbox.pointer, bytes: outbox.count, to: 0, tag: Wire.answerTag, into: answer)
            case .call:
                let n = answerCall(&reader, shard: shard, widths: widths, h: h, rank: world.rank, into: outbox)
                if n >= 0 {
                    summary.calls += 1
                    summary.assignments += n
                }
                try world.send(outbox.pointer, bytes: outbox.count, to: 0, tag: Wire.answerTag, into: answer)
            default:
                throw DistributedError(.shape, "rank \(world.rank): a message from rank 0: expected a known kind, found \(kind)")
            }
        }
    }

    /// Runs the call message in `reader` (after its kind) on `shard` and writes the answer into `outbox`: the rows of
    /// its assignments in the order sent, or a failure with its message. Returns the assignments run, -1 on failure.
    static func answerCall(_ reader: inout MessageReader, shard: ExpertShard?, widths: [(inWidth: Int, outWidth: Int)], h: ScratchBuffer,
                           rank: Int, into outbox: MessageBuffer) -> Int {
        var id: Int64 = -1
        outbox.reset()
        outbox.append(Wire.Kind.rows.rawValue)
        do throws(DistributedError) {
            let module = Int(try reader.read(Int32.self))
            let n = Int(try reader.read(Int32.self))
            let unique = Int(try reader.read(Int32.self))
            id = try reader.read(Int64.self)
            guard let shard else { throw DistributedError(.rank, "rank \(rank): a call before the hello") }
            guard widths.indices.contains(module), n >= 0, unique >= 0, unique <= n else {
                throw DistributedError(.shape, "rank \(rank): a call for module \(module) with \(n) assignments and \(unique) rows: out of range")
            }
            let (inWidth, outWidth) = widths[module]
            let candidates = try reader.bytes(n * 4).assumingMemoryBound(to: Int32.self)
            let tokens = try reader.bytes(n * 4).assumingMemoryBound(to: Int32.self)
            let weights = try reader.bytes(n * 4).assumingMemoryBound(to: Float.self)
            let x = try reader.bytes(unique * inWidth * 4).assumingMemoryBound(to: Float.self)
            for i in 0..<n where tokens[i] < 0 || Int(tokens[i]) >= unique {
                throw DistributedError(.shape, "rank \(rank): assignment \(i) names row \(tokens[i]) of \(unique)")
            }
            outbox.append(Int32(0))
            outbox.append(Int32(n))
            outbox.append(Int32(0))
            outbox.append(id)
            let rows = outbox.extend(n * outWidth * 4).assumingMemoryBound(to: Float.self)
            try shard.run(module: module, inWidth: inWidth, outWidth: outWidth, candidates: candidates, tokens: tokens,
                          weights: weights, count: n, x: x, h: h, rows: rows)
            return n
        } catch {
            outbox.reset()
            outbox.append(Wire.Kind.rows.rawValue)
            outbox.append(Int32(1))
            outbox.append(Int32(0))
            outbox.append(Int32(0))
            outbox.append(id)
            outbox.append(error.message)
            return -1
        }
    }

    /// Tells every serving rank of `world` to stop (from rank 0, when it ends without a distributed runtime, or
    /// after one failed to start), waiting at most 5 s for the messages to leave.
    public static func stopAll(world: MPIWorld) {
        DistributedRuntime.sendStop(world: world, timeoutNanos: 5_000_000_000)
    }

    /// Reads the hello, checks this rank's library against rank 0's, and copies this rank's share.
    private static func hello(_ reader: inout MessageReader, library: ExpertLibrary, world: MPIWorld, memoryCap: Int?) throws(DistributedError) -> ExpertShard {
        let who = "rank \(world.rank)"
        let magic = try reader.read(UInt32.self)
        guard magic == Wire.magic else {
            throw DistributedError(.rank, "\(who): rank 0's hello: expected magic \(Wire.magic) (same byte order), found \(magic)")
        }
        let version = try reader.read(Int32.self)
        guard version == Wire.version else {
            throw DistributedError(.rank, "\(who): rank 0 speaks protocol version \(version), this build \(Wire.version): run one build on every rank")
        }
        let modules = Int(try reader.read(Int32.self))
        let experts = Int(try reader.read(Int32.self))
        let fingerprint = try reader.read(UInt64.self)
        let cap = try reader.read(Int64.self)
        // Kernels of different instruction sets round differently: every rank runs rank 0's, or the bits would differ.
        let isaCode = try reader.read(Int32.self)
        guard let isa = Kernels.ISA(rawValue: isaCode) else { throw DistributedError(.rank, "\(who): rank 0 runs kernel instruction set \(isaCode), unknown to this build") }
        if Kernels.activeISA != isa {
            guard Kernels.setISA(isa) else {
                throw DistributedError(.rank, "\(who): rank 0 runs \(isa) kernels, which this CPU lacks (its best is \(Kernels.bestISA)); the results would not be rank 0's bits: run the ranks on CPUs with the same instruction sets")
            }
        }
        guard modules == library.modules.count, experts == library.experts.count, fingerprint == library.shardFingerprint else {
            throw DistributedError(.rank, "\(who): library \(library.source.path): expected rank 0's library (\(modules) modules, \(experts) experts), found another (\(library.modules.count) modules, \(library.experts.count) experts\(fingerprint == library.shardFingerprint ? "" : ", different names or shapes"))")
        }
        var held = Set<Int>()
        for e in 0..<experts {
            let count = Int(try reader.read(Int32.self))
            guard count >= 0 && count <= world.size else { throw DistributedError(.shape, "\(who): rank 0's hello: expert \(e) on \(count) ranks") }
            for _ in 0..<count {
                let rank = Int(try reader.read(Int32.self))
                if rank == world.rank { held.insert(e) }
            }
        }
        let caps = [memoryCap, cap >= 0 ? Int(cap) : nil].compactMap { $0 }
        return try ExpertShard(library: library, held: held, memoryCap: caps.min(), who: who)
    }
}
