import Foundation
@testable import PhatgooseFormats
import PhatgooseLibrary
import PhatgooseRouting
import Testing

/// `import-official` on the fixture checkpoints of Tests/Fixtures/official (made once with PyTorch in the official
/// layout; golden outputs from the official Router and FFNExperts classes, see its README).
@Suite("official checkpoint import")
struct OfficialImportTests {
    static let fixtures = packageRoot + "/Tests/Fixtures/official"

    @Test("import then apply gives the official classes' experts, weights and deltas",
          arguments: [("tiny_f32", "f32", 3, 4), ("tiny_bf16", "bf16", 3, 4), ("tiny_f16", "f16", 3, 4), ("tiny_zip64", "f32", 3, 4),
                      ("twelve_experts_f16", "twelve_f16", 12, 1)])
    func conformance(_ checkpoint: String, _ expectedName: String, _ experts: Int, _ modules: Int) throws {
        let directory = TemporaryDirectory()
        let library = directory.file("lib")
        let summary = try OfficialCheckpointImport.run(checkpoint: Self.fixtures + "/\(checkpoint).pt", to: library)
        // Expert i is the integer after `__`, whatever order the keys come in (the twelve-expert file has them in
        // byte order: __10 before __2).
        #expect(summary.experts == OfficialCheckpointImport.defaultNames(count: experts))
        #expect(summary.modules == modules)
        let loaded = try ExpertLibrary.load(path: library)
        let input = try SafetensorsFile(path: Self.fixtures + (experts == 12 ? "/input_twelve.safetensors" : "/input.safetensors"))
        let output = directory.file("out.safetensors")
        try ApplyFile.apply(loaded, input: input, options: RoutingOptions(defaults: loaded.routing)).write(to: output)
        let actual = try SafetensorsFile(path: output)
        let expected = try SafetensorsFile(path: Self.fixtures + "/expected_\(expectedName).safetensors")
        #expect(Set(actual.tensors.map(\.name)) == Set(expected.tensors.map(\.name)))
        for info in expected.tensors {
            let got = try #require(actual.tensor(named: info.name))
            #expect(got.info.shape == info.shape, "\(info.name)")
            if info.name.hasSuffix(".experts") {
                #expect(try got.int32s() == expected.view(info).int32s(), "\(checkpoint): \(info.name)")
            } else {
                let a = try got.floats(), b = try expected.view(info).floats()
                let scale = b.map { abs($0) }.max() ?? 1
                let worst = zip(a, b).map { abs($0 - $1) }.max() ?? 0
                #expect(worst <= 1e-5 * max(scale, 1e-3), "\(checkpoint): \(info.name): worst difference \(worst) of \(scale)")
            }
        }
        // Routing is not trivial in the fixture: more than one expert wins first place somewhere.
        let firsts = Set(try expected.tensors.filter { $0.name.hasSuffix(".experts") }.flatMap { info in
            try expected.view(info).int32s().enumerated().filter { $0.offset % 2 == 0 }.map(\.element)
        })
        #expect(firsts.count > 1)
    }

    @Test("weights keep their dtype and bits: lora_A is layer1 transposed, lora_B layer2 transposed, gates the embeddings",
          arguments: ["tiny_bf16", "tiny_f16", "tiny_f32"])
    func exactTensors(_ name: String) throws {
        let directory = TemporaryDirectory()
        let library = directory.file("lib")
        _ = try OfficialCheckpointImport.run(checkpoint: Self.fixtures + "/\(name).pt", to: library, names: ["a", "b", "c"])
        let checkpoint = try TorchCheckpoint(path: Self.fixtures + "/\(name).pt")
        var compared = 0
        for (e, expert) in ["a", "b", "c"].enumerated() {
            let adapter = try SafetensorsFile(path: library + "/\(expert)/adapter_model.safetensors")
            let gates = try SafetensorsFile(path: library + "/\(expert)/gates.safetensors")
            let config = try AdapterConfig(path: library + "/\(expert)/adapter_config.json")
            for (key, tensor) in checkpoint.tensors where key.hasSuffix("layer1__\(e)") {
                let module = String(key.dropLast("._addons.expert_lora.layer1__\(e)".count))
                let a = try #require(adapter.tensor(named: "base_model.model.\(module).lora_A.weight"))
                let b = try #require(adapter.tensor(named: "base_model.model.\(module).lora_B.weight"))
                let g = try #require(gates.tensor(named: module))
                let layer2 = try #require(checkpoint.tensor(named: "\(module)._addons.expert_lora.layer2__\(e)"))
                let embedding = try #require(checkpoint.tensor(named: "\(module)._addons.router.expert_embeddings__\(e)"))
                #expect(a.info.dtype == tensor.dtype && b.info.dtype == layer2.dtype && g.info.dtype == embedding.dtype)
                #expect(a.info.shape == [tensor.shape[1], tensor.shape[0]] && b.info.shape == [layer2.shape[1], layer2.shape[0]])
                // Element (i, j) of lora_A is element (j, i) of layer1, read through the checkpoint's own strides.
                let size = tensor.dtype.size
                let storage = try checkpoint.bytes(of: tensor.storage)
                for i in 0..<tensor.shape[1] {
                    for j in 0..<tensor.shape[0] {
                        let source = (tensor.storageOffset + j * tensor.strides[0] + i * tensor.strides[1]) * size
                        let target = (i * tensor.shape[0] + j) * size
                        #expect(Array(storage[source..<(source + size)]) == Array(a.bytes[target..<(target + size)]))
                    }
                }
                #expect(config.scale(for: module) == 1 / Double(tensor.shape[1]))
                compared += 1
            }
        }
        #expect(compared == 12)
    }

    struct BadCheckpoint: Sendable, CustomTestStringConvertible {
        let file: String
        let expected: [String]
        var testDescription: String { file }
    }

    static let badCheckpoints: [BadCheckpoint] = [
        BadCheckpoint(file: "malicious.pt", expected: ["refused global posix.system", "never runs its code"]),
        BadCheckpoint(file: "malicious_exec.pt", expected: ["refused global __builtin__.exec"]),
        BadCheckpoint(file: "legacy.pt", expected: ["legacy (non-zip) pickle"]),
        BadCheckpoint(file: "truncated.pt", expected: ["truncated"]),
        BadCheckpoint(file: "missing_layer2.pt", expected: ["key 'encoder.block.0.layer.1.DenseReluDense.wo._addons.expert_lora.layer2__1'", "missing"]),
        BadCheckpoint(file: "missing_embedding.pt", expected: ["key 'encoder.block.0.layer.0.SelfAttention.q._addons.router.expert_embeddings__2'", "missing"]),
        BadCheckpoint(file: "index_gap.pt", expected: ["layer1__2'", "found index 2 but no index 1"]),
        BadCheckpoint(file: "shape_mismatch.pt", expected: ["key 'encoder.block.0.layer.1.DenseReluDense.wo._addons.expert_lora.layer2__1'", "found [8, 16]"]),
        BadCheckpoint(file: "shape_mismatch_embedding.pt", expected: ["expert_embeddings__0'", "input width"]),
        BadCheckpoint(file: "no_experts.pt", expected: ["found none among"]),
        // Files that attack the reader (Tests/Reference/make_hostile_checkpoints.py): each is refused at once, in
        // little memory, with no crash.
        BadCheckpoint(file: "hostile/amplify.pt", expected: ["container items", "refusing to amplify"]),
        BadCheckpoint(file: "hostile/count_overflow.pt", expected: ["expected a storage of at most 538 elements", "found 4611686018427387904"]),
        BadCheckpoint(file: "hostile/deep_nesting.pt", expected: ["expected a state dict", "found a tuple"]),
        BadCheckpoint(file: "hostile/deep_value.pt", expected: ["found none among 0 tensors"]),
        BadCheckpoint(file: "hostile/offset_overflow.pt", expected: ["offset 9223372036854775807", "to lie inside storage '0' of 4 elements"]),
        BadCheckpoint(file: "hostile/zero_stride_huge.pt", expected: ["layer1__0'", "no larger than its storage of 1 elements"]),
        BadCheckpoint(file: "hostile/zero_stride_overflow.pt", expected: ["layer1__0'", "no larger than its storage"]),
        BadCheckpoint(file: "hostile/zip64_offset_max.pt", expected: ["ZIP64 end of central directory", "9223372036854775807"]),
    ]

    @Test("bad checkpoints exit 1 naming the key or the problem, and leave nothing behind", arguments: badCheckpoints)
    func refused(_ bad: BadCheckpoint) throws {
        let marker = "/tmp/phatgoose-pwned-marker"
        try? FileManager.default.removeItem(atPath: marker)
        let directory = TemporaryDirectory()
        let result = try runPhatgoose(["import-official", Self.fixtures + "/" + bad.file, "--out", directory.file("lib")])
        #expect(result.status == 1)
        for text in bad.expected { #expect(result.stderr.contains(text), "stderr: \(result.stderr)") }
        #expect(result.stderr.split(separator: "\n").count == 1, "one line: \(result.stderr)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path).isEmpty, "nothing written")
        #expect(!FileManager.default.fileExists(atPath: marker), "the pickle's code ran")
    }

    @Test("a damaged storage fails its CRC-32 check")
    func damagedStorage() throws {
        let directory = TemporaryDirectory()
        var bytes = Array(try Data(contentsOf: URL(fileURLWithPath: Self.fixtures + "/tiny_f32.pt")))
        let checkpoint = try TorchCheckpoint(path: Self.fixtures + "/tiny_f32.pt")
        let layer1 = try #require(checkpoint.tensor(named: "encoder.block.0.layer.0.SelfAttention.q._addons.expert_lora.layer1__1"))
        let entry = try #require(checkpoint.archive.entry(named: "\(checkpoint.prefix)/data/\(layer1.storage.key)"))
        bytes[try checkpoint.archive.dataRange(of: entry).lowerBound + 5] ^= 0x40
        let path = directory.file("damaged.pt")
        writeBytes(bytes, to: path)
        #expect {
            _ = try OfficialCheckpointImport.run(checkpoint: path, to: directory.file("lib"))
        } throws: { error in
            guard let error = error as? FormatError else { return false }
            return error.code == .zip && error.message.contains("CRC-32") && error.subject == "entry '\(entry.name)'"
        }
    }

    @Test("--names must name every expert, uniquely and usably; the output must be new or empty")
    func namesAndOutput() throws {
        let directory = TemporaryDirectory()
        let checkpoint = Self.fixtures + "/tiny_f32.pt"
        for names in ["a,b", "a,b,b", "a,../x,c", "a,,c"] {
            let result = try runPhatgoose(["import-official", checkpoint, "--out", directory.file("lib"), "--names", names])
            #expect(result.status == 1, "\(names)")
            #expect(result.stderr.contains("--names"), "\(names): \(result.stderr)")
        }
        let taken = directory.file("taken")
        try FileManager.default.createDirectory(atPath: taken, withIntermediateDirectories: true)
        writeText("keep me", to: taken + "/note.txt")
        let result = try runPhatgoose(["import-official", checkpoint, "--out", taken])
        #expect(result.status == 1)
        #expect(result.stderr.contains("files in it"), "\(result.stderr)")
        #expect(try String(contentsOfFile: taken + "/note.txt", encoding: .utf8) == "keep me")
        let ok = try runPhatgoose(["import-official", checkpoint, "--out", directory.file("named"), "--names", "rte,copa,wsc", "--format", "json"])
        #expect(ok.status == 0, "\(ok.stderr)")
        #expect(ok.stdout.contains("\"experts\":[\"rte\",\"copa\",\"wsc\"]"), "\(ok.stdout)")
        let library = try ExpertLibrary.load(path: directory.file("named"))
        #expect(library.experts.map(\.name) == ["rte", "copa", "wsc"])
    }

    static func readPickle(_ bytes: [UInt8]) throws(FormatError) -> PickleValue {
        let storage = bytes.withUnsafeBytes { MappedFile(copying: $0, path: "test.pt") }
        var reader = TorchPickleReader(bytes: storage.bytes, file: "test.pt", entry: "test/data.pkl")
        return try withExtendedLifetime(storage) { () throws(FormatError) -> PickleValue in try reader.read() }
    }

    /// A pickle of a tiny dict: PROTO 2, then `body`, then STOP.
    static func pickle(_ body: [UInt8]) -> [UInt8] { [0x80, 0x02] + body + [0x2E] }

    @Test("the restricted unpickler refuses code globals and object-building opcodes before anything runs")
    func restrictedPickle() throws {
        let cases: [(String, [UInt8], String)] = [
            ("GLOBAL os.system", Array("cos\nsystem\n".utf8) + [0x58, 2, 0, 0, 0] + Array("ls".utf8) + [0x85, 0x52], "refused global os.system"),
            ("STACK_GLOBAL builtins.eval", [0x8C, 8] + Array("builtins".utf8) + [0x8C, 4] + Array("eval".utf8) + [0x93], "refused global builtins.eval"),
            ("INST", Array("(ios\nsystem\n".utf8), "refused pickle opcode 0x69"),
            ("NEWOBJ", [0x29, 0x29, 0x81], "refused pickle opcode 0x81"),
            ("REDUCE of a string", [0x58, 1, 0, 0, 0, 0x61, 0x29, 0x52], "expected REDUCE of an allowed global"),
            ("storage type called", Array("ctorch\nFloatStorage\n".utf8) + [0x29, 0x52], "only inside a persistent id"),
        ]
        for (name, body, expected) in cases {
            do {
                _ = try Self.readPickle(Self.pickle(body))
                Issue.record("\(name): read without an error")
            } catch {
                #expect(error.code == .pickle && error.message.contains(expected), "\(name): \(error)")
            }
        }
        // A truncated pickle is refused, not read past its end.
        do { _ = try Self.readPickle([0x80, 0x02, 0x58, 200, 0, 0, 0, 0x61]); Issue.record("read a truncated pickle") } catch {
            #expect(error.code == .pickle && error.message.contains("truncated"), "\(error)")
        }
    }
}
