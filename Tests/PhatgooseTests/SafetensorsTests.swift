import Foundation
import PhatgooseFormats
import Testing

/// A malformed safetensors file and a fragment its error message must contain.
struct MalformedCase: CustomTestStringConvertible, Sendable {
    let name: String
    let bytes: [UInt8]
    let expected: String
    var testDescription: String { name }
}

let f32x2 = [UInt8](repeating: 0, count: 8)

/// 4 KiB of reproducible random bytes (a 64-bit LCG), as a user's wrong file might be.
let randomBytes: [UInt8] = {
    var state: UInt64 = 0x9E37_79B9_7F4A_7C15
    return (0..<4096).map { _ in
        state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return UInt8(truncatingIfNeeded: state >> 56)
    }
}()

let malformedSafetensors: [MalformedCase] = [
    MalformedCase(name: "random bytes", bytes: randomBytes, expected: "not a safetensors file"),
    MalformedCase(name: "file shorter than 8 bytes", bytes: [1, 2, 3, 4], expected: "expected an 8-byte little-endian header length, found a file of 4 bytes"),
    MalformedCase(name: "header length above 100,000,000", bytes: rawSafetensors(header: "{}", declaredLength: 100_000_001), expected: "not a safetensors file: expected a header length of at most 100000000 bytes, found 100000001"),
    MalformedCase(name: "header length past the end of the file", bytes: rawSafetensors(header: "{}", declaredLength: 1000), expected: "the header of 1000 bytes runs past the end of the file"),
    MalformedCase(name: "header not UTF-8", bytes: rawSafetensors(header: "{\"a\u{00e9}\":1}").enumerated().map { $0.offset == 11 ? 0xFF : $0.element }, expected: "not valid UTF-8"),
    MalformedCase(name: "header not a JSON object", bytes: rawSafetensors(header: "[1, 2]  "), expected: "not a safetensors file: expected a JSON object starting with '{', found '['"),
    MalformedCase(name: "header invalid JSON", bytes: rawSafetensors(header: "{\"a\": }"), expected: "found invalid JSON"),
    MalformedCase(name: "header with leading whitespace", bytes: rawSafetensors(header: " {}"), expected: "starting with '{'"),
    MalformedCase(name: "unknown dtype (names are case-sensitive)", bytes: rawSafetensors(header: #"{"t":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}}"#, data: f32x2), expected: "expected a known dtype"),
    MalformedCase(name: "negative dim", bytes: rawSafetensors(header: #"{"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, data: f32x2), expected: "dim 0 of \"shape\" to be a non-negative integer, found the integer -2"),
    MalformedCase(name: "fractional dim", bytes: rawSafetensors(header: #"{"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}"#, data: f32x2), expected: "non-negative integer, found the number 2.0"),
    MalformedCase(name: "exponent dim", bytes: rawSafetensors(header: #"{"t":{"dtype":"F32","shape":[2e0],"data_offsets":[0,8]}}"#, data: f32x2), expected: "non-negative integer, found the number 2e0"),
    MalformedCase(name: "missing shape", bytes: rawSafetensors(header: #"{"t":{"dtype":"F32","data_offsets":[0,8]}}"#, data: f32x2), expected: "expected a \"shape\" field, found none"),
    MalformedCase(name: "missing dtype", bytes: rawSafetensors(header: #"{"t":{"shape":[2],"data_offsets":[0,8]}}"#, data: f32x2), expected: "expected a \"dtype\" field, found none"),
    MalformedCase(name: "missing data_offsets", bytes: rawSafetensors(header: #"{"t":{"dtype":"F32","shape":[2]}}"#, data: f32x2), expected: "expected a \"data_offsets\" field, found none"),
    MalformedCase(name: "data_offsets with one integer", bytes: rawSafetensors(header: #"{"t":{"dtype":"F32","shape":[2],"data_offsets":[8]}}"#, data: f32x2), expected: "exactly two integers, found an array of 1 elements"),
    MalformedCase(name: "data_offsets with three integers", bytes: rawSafetensors(header: #"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}"#, data: f32x2), expected: "exactly two integers, found an array of 3 elements"),
    MalformedCase(name: "fractional data_offsets", bytes: rawSafetensors(header: #"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0.0,8]}}"#, data: f32x2), expected: "non-negative integers, found the number 0.0"),
    MalformedCase(name: "shape times dtype size overflows", bytes: rawSafetensors(header: #"{"t":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}}"#, data: f32x2), expected: "overflows"),
    MalformedCase(name: "end - begin differs from the shape's size", bytes: rawSafetensors(header: #"{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, data: f32x2), expected: "needs 12 bytes, found data_offsets spanning 8"),
    MalformedCase(name: "end before begin", bytes: rawSafetensors(header: #"{"t":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#, data: f32x2), expected: "end >= begin"),
    MalformedCase(name: "gap between tensors", bytes: rawSafetensors(header: #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#, data: [UInt8](repeating: 0, count: 12)), expected: "expected data to start at byte 4 (the end of tensor 'a'), found 8: a gap"),
    MalformedCase(name: "overlapping tensors", bytes: rawSafetensors(header: #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, data: [UInt8](repeating: 0, count: 12)), expected: "found 4: an overlap"),
    MalformedCase(name: "data not starting at 0", bytes: rawSafetensors(header: #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, data: f32x2), expected: "expected data to start at byte 0 (the start of the data buffer), found 4"),
    MalformedCase(name: "bytes past the last tensor", bytes: rawSafetensors(header: #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, data: f32x2), expected: "found 4 bytes after the last tensor"),
    MalformedCase(name: "data past the end of the file", bytes: rawSafetensors(header: #"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, data: f32x2), expected: "past the end of the data buffer (8 bytes)"),
    MalformedCase(name: "__metadata__ with a non-string value", bytes: rawSafetensors(header: #"{"__metadata__":{"format":1}}"#), expected: "__metadata__ \"format\": expected a string, found the integer 1"),
    MalformedCase(name: "__metadata__ not a map", bytes: rawSafetensors(header: #"{"__metadata__":["x"]}"#), expected: "expected a map of strings to strings, found an array"),
    MalformedCase(name: "JSON nested deep enough to exhaust a stack", bytes: rawSafetensors(header: "{\"a\":" + String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000) + "}"), expected: "nested deeper than 128 levels"),
    MalformedCase(name: "duplicate tensor name", bytes: rawSafetensors(header: #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, data: f32x2), expected: "duplicate key \"a\""),
    MalformedCase(name: "tensor info not an object", bytes: rawSafetensors(header: #"{"a":[1]}"#), expected: "expected an object with dtype, shape and data_offsets, found an array"),
]

@Suite("safetensors reader")
struct SafetensorsReaderTests {
    @Test("refuses malformed files with a message naming what was expected and found", arguments: malformedSafetensors)
    func refusesMalformed(_ malformed: MalformedCase) throws {
        let directory = TemporaryDirectory()
        let path = directory.file("bad.safetensors")
        writeBytes(malformed.bytes, to: path)
        let message = try #require(errorMessage { _ = try SafetensorsFile(path: path) })
        #expect(message.contains(malformed.expected), "message: \(message)")
        #expect(message.hasPrefix(path), "the message names the file: \(message)")
    }

    @Test("accepts padded headers, null metadata, zero-sized and rank-0 tensors")
    func acceptsWhatTheReferenceAccepts() throws {
        let directory = TemporaryDirectory()
        let path = directory.file("ok.safetensors")
        let header = #"{"__metadata__":null,"empty":{"dtype":"F32","shape":[0,4],"data_offsets":[0,0]},"scalar":{"dtype":"BF16","shape":[],"data_offsets":[0,2]},"v":{"dtype":"F16","shape":[2],"data_offsets":[2,6]}}"# + "     "
        // BF16 1.5 = 0x3FC0; F16 -2 = 0xC000, F16 0.5 = 0x3800.
        writeBytes(rawSafetensors(header: header, data: [0xC0, 0x3F, 0x00, 0xC0, 0x00, 0x38]), to: path)
        let file = try SafetensorsFile(path: path)
        #expect(file.metadata == nil)
        #expect(file.tensors.map(\.name).sorted() == ["empty", "scalar", "v"])
        #expect(try file.tensor(named: "empty")!.floats() == [])
        #expect(try file.tensor(named: "scalar")!.floats() == [1.5])
        #expect(try file.tensor(named: "v")!.floats() == [-2, 0.5])
    }

    @Test("writer output reads back identically, in F32, F16 and BF16, with metadata")
    func writerRoundTrip() throws {
        let directory = TemporaryDirectory()
        let path = directory.file("rt.safetensors")
        var writer = SafetensorsWriter()
        writer.metadata = ["format": "pt", "note": "a \"quoted\" value"]
        let values: [Float] = [0, 1, -1.5, 3.25, 1e-3, 65504]
        writer.add("f32", floats: values, shape: [2, 3])
        writer.add("f16", floats: values, shape: [6], as: .f16)
        writer.add("bf16", floats: [1, -2, 0.5], shape: [3], as: .bf16)
        writer.add("ids", int32s: [-1, 0, 7], shape: [3, 1])
        try writer.write(to: path)
        let file = try SafetensorsFile(path: path)
        #expect(file.metadata == ["format": "pt", "note": "a \"quoted\" value"])
        #expect(try file.tensor(named: "f32")!.floats() == values)
        #expect(try file.tensor(named: "f16")!.floats() == [0, 1, -1.5, 3.25, 0.0010004043579101562, 65504])
        #expect(try file.tensor(named: "bf16")!.floats() == [1, -2, 0.5])
        #expect(try file.tensor(named: "ids")!.int32s() == [-1, 0, 7])
        #expect(file.dataStart % 8 == 0, "the header is padded to a multiple of 8")
    }

    @Test("a failed write leaves no file behind")
    func atomicWrite() throws {
        let directory = TemporaryDirectory()
        let path = directory.file("missing-dir/out.safetensors")
        var writer = SafetensorsWriter()
        writer.add("x", floats: [1], shape: [1])
        let error = #expect(throws: FormatError.self) { try writer.write(to: path) }
        #expect(error?.code == .io && error?.description.contains("cannot create a temporary file") == true, "\(String(describing: error))")
        #expect(!FileManager.default.fileExists(atPath: path))
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path).isEmpty)
    }
}

@Suite("JSON parser")
struct JSONParserTests {
    @Test("keeps integers apart from fractions and keeps key order")
    func numbersAndOrder() throws {
        let value = try JSONParser.parse(Array(#"{"b": 16, "a": 16.0, "c": [-0, 1e2, "\u00e9\n"]}"#.utf8))
        guard case let .object(members) = value else { Issue.record("not an object"); return }
        #expect(members.map(\.key) == ["b", "a", "c"])
        #expect(value["b"] == .number(JSONNumber(text: "16", isInteger: true)))
        #expect(value["a"] == .number(JSONNumber(text: "16.0", isInteger: false)))
        #expect(value["c"] == .array([.number(JSONNumber(text: "-0", isInteger: true)), .number(JSONNumber(text: "1e2", isInteger: false)), .string("é\n")]))
    }

    @Test("refuses what RFC 8259 refuses", arguments: ["{", "[1,]", "{\"a\":1,}", "01", "1.", "-", "\"\\x\"", "tru", "{} x", "\"\u{01}\"", "{\"a\" 1}", "\"\\ud800\""])
    func refusesInvalid(_ text: String) {
        #expect(throws: JSONParser.Failure.self) { _ = try JSONParser.parse(Array(text.utf8)) }
    }

    @Test("serialises what it parses")
    func roundTrip() throws {
        let text = #"{"a":[1,2.5,"x\"y"],"b":{"c":null,"d":true}}"#
        #expect(try JSONParser.parse(Array(text.utf8)).serialized() == text)
    }
}
