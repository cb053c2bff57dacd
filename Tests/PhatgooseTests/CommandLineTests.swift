import Foundation
import PhatgooseFormats
import PhatgooseLibrary
import Testing

/// The `phatgoose` binary's contract: exit 0 on success, 1 with one line on stderr for bad input, 2 for usage errors.
@Suite("phatgoose command line")
struct CommandLineTests {
    @Test("inspect exits 1 with one line naming the problem, for every malformed safetensors case", arguments: malformedSafetensors)
    func inspectMalformedFile(_ malformed: MalformedCase) throws {
        let directory = TemporaryDirectory()
        let path = directory.file("bad.safetensors")
        writeBytes(malformed.bytes, to: path)
        let result = try runPhatgoose(["inspect", path])
        #expect(result.status == 1)
        #expect(result.stderr.contains(malformed.expected), "stderr: \(result.stderr)")
        #expect(result.stderr.contains(path))
        #expect(result.stderr.split(separator: "\n").count == 1, "one line: \(result.stderr)")
        #expect(result.stdout.isEmpty)
    }

    @Test("inspect exits 1 with one line naming the problem, for every broken library", arguments: brokenLibraries)
    func inspectBrokenLibrary(_ broken: BrokenLibrary) throws {
        let directory = TemporaryDirectory()
        let root = directory.file("lib")
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        var fixture = LibraryFixture.standard()
        broken.breakIt(&fixture, root)
        fixture.write(to: root)
        let result = try runPhatgoose(["inspect", root, "--format", "json"])
        #expect(result.status == 1)
        #expect(result.stderr.contains(broken.expected), "stderr: \(result.stderr)")
        #expect(result.stderr.split(separator: "\n").count == 1, "one line: \(result.stderr)")
    }

    @Test("usage errors exit 2")
    func usageErrors() throws {
        #expect(try runPhatgoose(["inspect"]).status == 2)
        #expect(try runPhatgoose(["no-such-command"]).status == 2)
        #expect(try runPhatgoose(["synth", "--out", "/tmp/x", "--dtype", "f8"]).status == 2)
        #expect(try runPhatgoose(["apply", "--library", "a", "--input", "b", "--output", "c", "--top-k", "0"]).status == 2)
        #expect(try runPhatgoose(["--help"]).status == 0)
    }

    @Test("inspect of a missing path exits 1")
    func missingPath() throws {
        let result = try runPhatgoose(["inspect", "/nonexistent/lib"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("/nonexistent/lib: cannot open"))
    }

    @Test("synth then inspect round-trips; pack reads back identical; inspect of the pack matches")
    func synthInspectPack() throws {
        let directory = TemporaryDirectory()
        let library = directory.file("lib")
        let synth = try runPhatgoose(["synth", "--out", library, "--shape", "tiny", "--experts", "5", "--rank", "4",
                                      "--dtype", "bf16", "--gate-dtype", "f16", "--coverage", "0.7", "--seed", "3"])
        #expect(synth.status == 0, "\(synth.stderr)")
        let inspected = try runPhatgoose(["inspect", library, "--format", "json"])
        #expect(inspected.status == 0, "\(inspected.stderr)")
        let report = try JSONParser.parse(Array(inspected.stdout.utf8))
        guard case let .array(experts)? = report["experts"], case let .array(modules)? = report["modules"] else {
            Issue.record("inspect JSON lacks experts or modules: \(inspected.stdout)")
            return
        }
        #expect(experts.count == 5)
        #expect(modules.count == 36, "tiny has 2+2 gated T5 blocks: 2*7 + 2*11 layers")
        let packed = directory.file("lib.phatpack")
        let pack = try runPhatgoose(["pack", library, "--out", packed])
        #expect(pack.status == 0, "\(pack.stderr)")
        let inspectedPack = try runPhatgoose(["inspect", packed, "--format", "json"])
        #expect(inspectedPack.status == 0, "\(inspectedPack.stderr)")
        var packReport = try JSONParser.parse(Array(inspectedPack.stdout.utf8))
        var directoryReport = report
        // Everything but the source must agree.
        func withoutSource(_ value: JSONValue) -> JSONValue {
            guard case let .object(members) = value else { return value }
            return .object(members.filter { $0.key != "source" })
        }
        packReport = withoutSource(packReport)
        directoryReport = withoutSource(directoryReport)
        #expect(packReport == directoryReport)

        // Bit-identical tensors, configs and routing.
        let fromDirectory = try ExpertLibrary.load(path: library)
        let fromPack = try ExpertLibrary.load(path: packed)
        #expect(fromPack.source == .packed(packed))
        #expect(fromPack.routing == fromDirectory.routing)
        #expect(fromPack.experts.map(\.name) == fromDirectory.experts.map(\.name))
        #expect(fromPack.experts.map(\.config.document) == fromDirectory.experts.map(\.config.document))
        #expect(fromPack.modules.count == fromDirectory.modules.count)
        for (a, b) in zip(fromDirectory.modules, fromPack.modules) {
            #expect(a.name == b.name && a.inWidth == b.inWidth && a.outWidth == b.outWidth)
            #expect(a.experts.map(\.expert) == b.experts.map(\.expert))
            #expect(a.gateMatrix.isIdentical(to: b.gateMatrix))
            for (x, y) in zip(a.experts, b.experts) {
                #expect(x.a.isIdentical(to: y.a) && x.bTransposed.isIdentical(to: y.bTransposed) && x.gate.isIdentical(to: y.gate))
                #expect(x.scale == y.scale && x.rank == y.rank)
            }
        }
        // Tensors in a pack are 64-byte aligned, pointing into the mapping (no copy).
        for module in fromPack.modules {
            for piece in module.experts {
                #expect(Int(bitPattern: piece.a.pointer) % 64 == 0 && Int(bitPattern: piece.bTransposed.pointer) % 64 == 0)
            }
        }
    }

    @Test("a truncated pack is refused with exit 1 and no crash")
    func truncatedPack() throws {
        let directory = TemporaryDirectory()
        let library = directory.file("lib")
        #expect(try runPhatgoose(["synth", "--out", library, "--experts", "2", "--rank", "2"]).status == 0)
        let packed = directory.file("lib.phatpack")
        #expect(try runPhatgoose(["pack", library, "--out", packed]).status == 0)
        let bytes = try Array(Data(contentsOf: URL(fileURLWithPath: packed)))
        for cut in [10, 16, 100, bytes.count - 1] {
            let truncated = directory.file("cut-\(cut).phatpack")
            writeBytes(Array(bytes[0..<cut]), to: truncated)
            let result = try runPhatgoose(["inspect", truncated])
            #expect(result.status == 1, "cut at \(cut): \(result.stderr)")
            #expect(result.stderr.contains(truncated))
        }
    }

    @Test("apply refuses an unknown module and leaves no output file")
    func applyUnknownModule() throws {
        let directory = TemporaryDirectory()
        let library = directory.file("lib")
        #expect(try runPhatgoose(["synth", "--out", library, "--experts", "3", "--rank", "2"]).status == 0)
        var writer = SafetensorsWriter()
        writer.add("encoder.block.0.layer.0.SelfAttention.q", floats: [Float](repeating: 0.5, count: 64), shape: [2, 32])
        writer.add("not.a.module", floats: [1, 2], shape: [1, 2])
        let input = directory.file("x.safetensors")
        try writer.write(to: input)
        let output = directory.file("y.safetensors")
        let result = try runPhatgoose(["apply", "--library", library, "--input", input, "--output", output])
        #expect(result.status == 1)
        #expect(result.stderr.contains("tensor 'not.a.module': expected the name of a module of the library"))
        #expect(!FileManager.default.fileExists(atPath: output))
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path).sorted() == ["lib", "x.safetensors"])
    }

    @Test("apply refuses an input of the wrong width")
    func applyWrongWidth() throws {
        let directory = TemporaryDirectory()
        let library = directory.file("lib")
        #expect(try runPhatgoose(["synth", "--out", library, "--experts", "3", "--rank", "2"]).status == 0)
        var writer = SafetensorsWriter()
        writer.add("encoder.block.0.layer.0.SelfAttention.q", floats: [Float](repeating: 0.5, count: 62), shape: [2, 31])
        let input = directory.file("x.safetensors")
        try writer.write(to: input)
        let result = try runPhatgoose(["apply", "--library", library, "--input", input, "--output", directory.file("y.safetensors")])
        #expect(result.status == 1)
        #expect(result.stderr.contains("expected shape [T, 32]"))
    }
}
