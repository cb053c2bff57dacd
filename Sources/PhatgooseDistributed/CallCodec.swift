import PhatgooseRouting

/// The parts of a distributed call that do not touch MPI: splitting a dispatch plan over the ranks holding each
/// expert, the call message a rank receives, and placing the rows it answers with back into the plan's order.
enum CallCodec {
    /// A piece of the plan one rank runs: `count` assignments from `start`, all of candidate `candidate`.
    typealias Segment = (start: Int, count: Int, candidate: Int)

    /// Splits each candidate's assignments in `plan` into contiguous blocks, one per rank holding it
    /// (`holders[c]`), into `segments[rank]` (cleared first), in plan order. Throws `.shape` for a chosen candidate
    /// no rank holds.
    static func split(_ plan: DispatchPlan, holders: [[Int]], module: String, into segments: inout [[Segment]]) throws(DistributedError) {
        for r in segments.indices { segments[r].removeAll(keepingCapacity: true) }
        for c in 0..<plan.candidateCount {
            let range = plan.range(of: c)
            guard !range.isEmpty else { continue }
            let ranks = c < holders.count ? holders[c] : []
            guard !ranks.isEmpty, ranks.allSatisfy({ segments.indices.contains($0) }) else {
                throw DistributedError(.shape, "module \(module): candidate \(c) has no rank holding its weights")
            }
            for (i, rank) in ranks.enumerated() {
                let lo = range.lowerBound + range.count * i / ranks.count
                let hi = range.lowerBound + range.count * (i + 1) / ranks.count
                if hi > lo { segments[rank].append((lo, hi - lo, c)) }
            }
        }
    }

    /// Writes the call message for `segments` into `message`: header, each assignment's candidate, row and weight,
    /// then each distinct token's input row once (in first-use order). `localToken` (at least the call's tokens
    /// long, all -1) is restored to -1 afterwards. Returns the number of assignments.
    static func encodeCall(_ segments: [Segment], module: Int, callID: Int64, planTokens: UnsafePointer<Int32>,
                           planWeights: UnsafePointer<Float>, x: UnsafePointer<Float>, inWidth: Int, localToken: inout [Int32],
                           order: inout [Int32], into message: MessageBuffer) -> Int {
        let n = segments.reduce(0) { $0 + $1.count }
        message.reset()
        message.reserve(Wire.callHeader + n * 12 + n * inWidth * 4)
        message.append(Wire.Kind.call.rawValue)
        message.append(Int32(module))
        message.append(Int32(n))
        let uniqueAt = message.count
        message.append(Int32(0))
        message.append(callID)
        let candidates = message.extend(n * 4).assumingMemoryBound(to: Int32.self)
        let local = message.extend(n * 4).assumingMemoryBound(to: Int32.self)
        let weights = message.extend(n * 4).assumingMemoryBound(to: Float.self)
        order.removeAll(keepingCapacity: true)
        var i = 0
        for segment in segments {
            for a in segment.start..<(segment.start + segment.count) {
                let t = Int(planTokens[a])
                if localToken[t] < 0 {
                    localToken[t] = Int32(order.count)
                    order.append(Int32(t))
                }
                candidates[i] = Int32(segment.candidate)
                local[i] = localToken[t]
                weights[i] = planWeights[a]
                i += 1
            }
        }
        message.pointer.storeBytes(of: Int32(order.count), toByteOffset: uniqueAt, as: Int32.self)
        let rowBytes = inWidth * 4
        let xs = message.extend(order.count * rowBytes)
        for (j, t) in order.enumerated() {
            (xs + j * rowBytes).copyMemory(from: x + Int(t) * inWidth, byteCount: rowBytes)
            localToken[Int(t)] = -1
        }
        return n
    }

    /// Reads a rank's answer to call `callID` and copies its rows into `rows` at the plan positions of `segments`
    /// (`outWidth` floats apart). Throws `.rank` with the rank's message when it failed, `.shape` when the answer
    /// is not the one expected.
    static func decodeRows(_ reader: inout MessageReader, callID: Int64, segments: [Segment], outWidth: Int,
                           into rows: UnsafeMutablePointer<Float>) throws(DistributedError) {
        let n = segments.reduce(0) { $0 + $1.count }
        let kind = try reader.read(Int32.self)
        let status = try reader.read(Int32.self)
        let count = try reader.read(Int32.self)
        _ = try reader.read(Int32.self)
        let id = try reader.read(Int64.self)
        guard kind == Wire.Kind.rows.rawValue, id == callID else {
            throw DistributedError(.shape, "\(reader.what): expected kind \(Wire.Kind.rows.rawValue) of call \(callID), found kind \(kind) of call \(id)")
        }
        guard status == 0 else { throw DistributedError(.rank, reader.rest) }
        guard Int(count) == n else { throw DistributedError(.shape, "\(reader.what): expected \(n) rows, found \(count)") }
        var from = try reader.bytes(n * outWidth * 4)
        for segment in segments {
            let bytes = segment.count * outWidth * 4
            UnsafeMutableRawPointer(rows + segment.start * outWidth).copyMemory(from: from, byteCount: bytes)
            from += bytes
        }
    }
}
