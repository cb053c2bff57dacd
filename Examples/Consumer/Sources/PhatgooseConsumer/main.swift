// phatgoose-consumer: opens an expert library (LIBRARY, or a synthetic one written with PhatgooseSynth), serves it
// with a Runtime, applies one layer to a generated batch and prints a checksum: the same batch and checksum as the
// C example (Examples/c/route.c), so the two can be compared line for line.
//
//   PhatgooseConsumer [LIBRARY] [--layer NAME] [--tokens T] [--seed S]

import Foundation
import PhatgooseLibrary
import PhatgooseRuntime
import PhatgooseSynth

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("PhatgooseConsumer: \(message)\n".utf8))
    exit(1)
}

var libraryPath: String?
var layerName: String?
var tokens = 16
var seed: UInt64 = 1
var arguments = CommandLine.arguments.dropFirst()
while let argument = arguments.popFirst() {
    switch argument {
    case "--layer": layerName = arguments.popFirst()
    case "--tokens": tokens = arguments.popFirst().flatMap { Int($0) } ?? -1
    case "--seed": seed = arguments.popFirst().flatMap { UInt64($0) } ?? 0
    default: libraryPath = argument
    }
}
guard tokens >= 0 else { fail("--tokens: expected a count") }

// The library: the caller's, or a synthetic one written to a temporary directory and loaded like any other.
var temporary: String?
if libraryPath == nil {
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("phatgoose-consumer-\(getpid())").path
    do {
        try Synth.writeLibrary(SynthOptions(shape: ModelShape.presets["tiny"]!, experts: 6), to: directory)
    } catch {
        fail("synth: \(error)")
    }
    temporary = directory
    libraryPath = directory
}
defer { if let temporary { try? FileManager.default.removeItem(atPath: temporary) } }

/// The C example's xorshift64* batch: uniform floats in [-1, 1), exactly representable.
func generate(count: Int, seed: UInt64) -> [Float] {
    var state = seed &* 0x9E37_79B9_7F4A_7C15 &+ 1
    return (0..<count).map { _ in
        state ^= state >> 12
        state ^= state << 25
        state ^= state >> 27
        let bits = state &* 2_685_821_657_736_338_717
        return Float(Int32(truncatingIfNeeded: (bits >> 40) & 0xFF_FFFF)) / 8_388_608 - 1
    }
}

/// FNV-1a (64-bit) over the bytes of each array, as the C example computes it.
func checksum(_ parts: [[UInt8]]) -> String {
    var hash: UInt64 = 14_695_981_039_346_656_037
    for part in parts {
        for byte in part {
            hash ^= UInt64(byte)
            hash = hash &* 1_099_511_628_211
        }
    }
    let digits = String(hash, radix: 16)
    return String(repeating: "0", count: 16 - digits.count) + digits
}

func bytes<T>(_ values: [T]) -> [UInt8] { values.withUnsafeBytes { Array($0) } }

struct ConsumerError: Error, CustomStringConvertible {
    var message: String
    var description: String { message }
}

do {
    let library = try ExpertLibrary.load(path: libraryPath!)
    let runtime = try Runtime(library: library)
    defer { runtime.shutdown() }
    print("library: \(runtime.library.experts.count) experts, \(runtime.library.modules.count) modules")
    let name = layerName ?? runtime.library.modules[0].name
    guard let layer = runtime.layer(named: name) else { throw ConsumerError(message: "layer \(name): expected a module of the library, found none") }
    let (inWidth, outWidth) = try runtime.widths(of: layer)
    print("layer \(name): in \(inWidth), out \(outWidth), slots \(try runtime.slots(of: layer))")
    let x = generate(count: tokens * inWidth, seed: seed)
    let result = try runtime.apply(layer, input: x, tokens: tokens)
    print("checksum \(name): \(checksum([bytes(result.delta), bytes(result.experts), bytes(result.weights)]))")
    let statistics = runtime.statisticsSnapshot()
    print("statistics: calls \(statistics.calls), tokens \(statistics.tokens); tokens per expert: \(statistics.tokensPerExpert.map(String.init).joined(separator: " "))")
} catch {
    if let temporary { try? FileManager.default.removeItem(atPath: temporary) }
    fail("\(error)")
}
