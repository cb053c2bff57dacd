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

    @Test("loadtest --clients refuses a bad list, a sweep with --rate and --rounds without a sweep, naming the option")
    func loadtestClientListErrors() throws {
        let directory = TemporaryDirectory()
        let library = directory.file("lib")
        #expect(try runPhatgoose(["synth", "--out", library, "--shape", "tiny", "--experts", "3", "--rank", "2"]).status == 0)
        for (arguments, message) in [
            (["--clients", "1,,4"], "--clients: expected a comma-separated list of client counts (such as 1,2,4,8,16), found an empty item at position 2 in \"1,,4\""),
            (["--clients", "1,0"], "--clients: expected 1 to 4096, found 0 in \"1,0\""),
            (["--clients", "0"], "--clients: expected 1 to 4096, found 0"),
            (["--clients", "2,x"], "--clients: expected every item to be a whole number of clients from 1 to 4096, found \"x\" in \"2,x\""),
            (["--clients", "1,2,1"], "--clients: expected distinct client counts, found 1 twice in \"1,2,1\""),
            (["--clients", "1,8192"], "--clients: expected 1 to 4096, found 8192 in \"1,8192\""),
            (["--clients", "1,2", "--rate", "5"], "--clients 1,2 with --rate 5.0: a sweep measures closed loops only"),
            (["--clients", "4", "--rounds", "3"], "--rounds: only with a sweep (--clients with several counts, such as 1,2,4), found --clients 4"),
            (["--clients", "1,2", "--rounds", "0"], "--rounds: expected 1 to 1000, found 0"),
        ] {
            let result = try runPhatgoose(["loadtest", "--library", library, "--progress", "none"] + arguments)
            #expect(result.status == 2, "\(arguments)")
            #expect(result.stderr.contains(message), "\(arguments): \(result.stderr)")
            #expect(result.stdout.isEmpty)
        }
        let profile = try runPhatgoose(["profile", "--library", library, "--clients", "1,2", "--out", directory.file("p")])
        #expect(profile.status == 2 && profile.stderr.contains("--clients: expected one client count"), "\(profile.stderr)")
    }

    @Test("loadtest --clients 1,2 writes the sweep's JSON rows atomically; one count keeps the single run's report")
    func loadtestSweepWritesRows() throws {
        let directory = TemporaryDirectory()
        let library = directory.file("lib")
        #expect(try runPhatgoose(["synth", "--out", library, "--shape", "tiny", "--experts", "3", "--rank", "2"]).status == 0)
        let common = ["loadtest", "--library", library, "--duration", "0.3", "--warmup", "0.05", "--workers", "1", "--progress", "none",
                      "--decode-tokens", "1-4", "--prefill-tokens", "16-32", "--format", "json"]
        let output = directory.file("sweep.json")
        let sweep = try runPhatgoose(common + ["--clients", "1,2", "--rounds", "1", "--output", output])
        #expect(sweep.status == 0, "\(sweep.stderr)")
        #expect(sweep.stdout.isEmpty, "the report goes to --output")
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path).sorted() == ["lib", "sweep.json"], "no temporary file is left")
        let json = try JSONParser.parse(Array(try String(contentsOfFile: output, encoding: .utf8).utf8))
        #expect(json["mode"] == .string("closed_sweep") && json["rounds"] == .integer(1) && json["workers"] == .integer(1))
        guard case let .array(rows)? = json["rows"] else { Issue.record("no rows: \(json)"); return }
        #expect(rows.map { $0["num_clients"] } == [.integer(1), .integer(2)])
        #expect(rows.allSatisfy { row in
            if case let .number(n)? = row["total_token_throughput"] { return n.double > 0 } else { return false }
        })
        #expect(rows.first?["throughput_ratio"] == .double(1))
        // One count: the single run's report, as before the sweep existed.
        let single = try runPhatgoose(common + ["--clients", "2"])
        #expect(single.status == 0, "\(single.stderr)")
        let report = try JSONParser.parse(Array(single.stdout.utf8))
        #expect(report["mode"] == .string("closed") && report["num_clients"] == .integer(2) && report["rows"] == nil)
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

/// Outputs never destroy inputs, interrupted writes leave nothing, and the tool answers as people expect.
@Suite("phatgoose command line: data safety")
struct DataSafetyTests {
    /// A synthesised library and activations for it, in a fresh directory.
    static func libraryAndInput() throws -> (TemporaryDirectory, library: String, input: String) {
        let directory = TemporaryDirectory()
        let library = directory.file("lib")
        let input = directory.file("x.safetensors")
        let synth = try runPhatgoose(["synth", "--out", library, "--experts", "3", "--rank", "2", "--activations", input, "--tokens", "8"])
        #expect(synth.status == 0, "\(synth.stderr)")
        return (directory, library, input)
    }

    static func bytes(_ path: String) throws -> [UInt8] { Array(try Data(contentsOf: URL(fileURLWithPath: path))) }

    @Test("apply refuses an output that is, or resolves to, its input or a file of its library, and changes nothing")
    func applyRefusesInputs() throws {
        let (directory, library, input) = try Self.libraryAndInput()
        let adapter = library + "/expert0/adapter_model.safetensors"
        try FileManager.default.createSymbolicLink(atPath: directory.file("link.safetensors"), withDestinationPath: input)
        #expect(link(input, directory.file("hard.safetensors")) == 0)
        #expect(link(adapter, directory.file("hard-adapter.safetensors")) == 0)
        try FileManager.default.createDirectory(atPath: directory.file("sub"), withIntermediateDirectories: true)
        let before = try Self.bytes(input), adapterBefore = try Self.bytes(adapter)
        let outputs = [input, directory.file("link.safetensors"), directory.file("hard.safetensors"), directory.file("sub/../x.safetensors"),
                       adapter, directory.file("sub/../lib/expert0/adapter_model.safetensors"), directory.file("hard-adapter.safetensors"),
                       library + "/expert1/new.safetensors"]
        for output in outputs {
            let result = try runPhatgoose(["apply", "--library", library, "--input", input, "--output", output])
            #expect(result.status == 1, "\(output): \(result.stderr)")
            #expect(result.stderr.contains("--output: expected a path that is not an input of this command"), "\(output): \(result.stderr)")
        }
        #expect(try Self.bytes(input) == before)
        #expect(try Self.bytes(adapter) == adapterBefore)
        #expect(!FileManager.default.fileExists(atPath: library + "/expert1/new.safetensors"))
        #expect(try runPhatgoose(["inspect", library]).status == 0)
    }

    @Test("pack refuses an output inside the library it packs; synth and import-official refuse a directory with files")
    func packAndSynthRefuse() throws {
        let (directory, library, _) = try Self.libraryAndInput()
        let config = library + "/expert0/adapter_config.json"
        let before = try Self.bytes(config)
        for output in [config, library + "/lib.phatpack", library + "/../lib/expert2/gates.safetensors"] {
            let result = try runPhatgoose(["pack", library, "--out", output])
            #expect(result.status == 1, "\(output)")
            #expect(result.stderr.contains("--out: expected a path that is not an input of this command"), "\(result.stderr)")
        }
        #expect(try Self.bytes(config) == before)
        #expect(!FileManager.default.fileExists(atPath: library + "/lib.phatpack"))
        // A pack of a pack onto itself is refused too.
        let packed = directory.file("lib.phatpack")
        #expect(try runPhatgoose(["pack", library, "--out", packed]).status == 0)
        #expect(try runPhatgoose(["pack", packed, "--out", packed]).status == 1)
        // synth over an existing library: refused, the library intact.
        let synth = try runPhatgoose(["synth", "--out", library, "--experts", "2", "--seed", "9"])
        #expect(synth.status == 1)
        #expect(synth.stderr.contains("found one with files in it"), "\(synth.stderr)")
        #expect(try Self.bytes(config) == before)
        #expect(try runPhatgoose(["inspect", library]).status == 0)
        let entries = try FileManager.default.contentsOfDirectory(atPath: directory.path)
        #expect(!entries.contains { $0.contains(".tmp-") }, "\(entries)")
    }

    @Test("SIGTERM and SIGINT during a large pack leave neither the output nor a temporary file", arguments: [SIGTERM, SIGINT])
    func interruptedPack(_ signal: Int32) throws {
        // A library of zeros (valid: finite values), 4 experts x 64 MiB, written directly so that making it is quick.
        let directory = TemporaryDirectory()
        let library = directory.file("lib")
        let (inWidth, outWidth, rank) = (4096, 4096, 2048)
        var entries: [LibraryManifest.Entry] = []
        for e in 0..<4 {
            let expert = library + "/e\(e)"
            try FileManager.default.createDirectory(atPath: expert, withIntermediateDirectories: true)
            var adapter = SafetensorsWriter()
            adapter.add("base_model.model.m.lora_A.weight", dtype: .f32, shape: [rank, inWidth], bytes: [UInt8](repeating: 0, count: rank * inWidth * 4))
            adapter.add("base_model.model.m.lora_B.weight", dtype: .f32, shape: [outWidth, rank], bytes: [UInt8](repeating: 0, count: outWidth * rank * 4))
            try adapter.write(to: expert + "/adapter_model.safetensors")
            var gates = SafetensorsWriter()
            gates.add("m", floats: (0..<inWidth).map { Float(($0 * (e + 3)) % 7) }, shape: [inWidth])
            try gates.write(to: expert + "/gates.safetensors")
            writeText(#"{"peft_type": "LORA", "r": \#(rank), "lora_alpha": 1, "target_modules": ["m"]}"#, to: expert + "/adapter_config.json")
            entries.append(LibraryManifest.Entry(name: "e\(e)", path: "e\(e)"))
        }
        writeText(LibraryManifest(experts: entries, routing: RoutingDefaults()).document().serialized(), to: library + "/library.json")

        let output = directory.file("out")
        try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: phatgooseBinary)
        process.arguments = ["pack", library, "--out", output + "/lib.phatpack"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        // Wait until the temporary file exists (the write has begun), then interrupt.
        var sawTemporary = false
        while process.isRunning {
            if let names = try? FileManager.default.contentsOfDirectory(atPath: output), names.contains(where: { $0.hasPrefix(".lib.phatpack.tmp-") }) {
                sawTemporary = true
                kill(process.processIdentifier, signal)
                break
            }
            usleep(200)
        }
        process.waitUntilExit()
        #expect(sawTemporary, "the pack finished before it could be interrupted")
        #expect(process.terminationReason == .uncaughtSignal && process.terminationStatus == signal)
        let left = try FileManager.default.contentsOfDirectory(atPath: output)
        #expect(left == [], "left behind: \(left)")
    }

    @Test("a library file reached through a symbolic link is an input too; profile writes none of its files over the library")
    func linkedLibraryFiles() throws {
        let (directory, library, input) = try Self.libraryAndInput()
        let outside = directory.file("outside")
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        try FileManager.default.moveItem(atPath: library + "/expert1/gates.safetensors", toPath: outside + "/gates.safetensors")
        try FileManager.default.createSymbolicLink(atPath: library + "/expert1/gates.safetensors", withDestinationPath: outside + "/gates.safetensors")
        let before = try Self.bytes(outside + "/gates.safetensors")
        for arguments in [["apply", "--library", library, "--input", input, "--output", outside + "/gates.safetensors"],
                          ["pack", library, "--out", outside + "/gates.safetensors"]] {
            let result = try runPhatgoose(arguments)
            #expect(result.status == 1 && result.stderr.contains("not an input of this command"), "\(arguments[0]): \(result.stderr)")
        }
        #expect(try Self.bytes(outside + "/gates.safetensors") == before)
        // A packed library that happens to sit where profile would write its trace.
        let profile = directory.file("profile")
        try FileManager.default.createDirectory(atPath: profile, withIntermediateDirectories: true)
        #expect(try runPhatgoose(["pack", library, "--out", profile + "/trace.json"]).status == 0)
        let packed = try Self.bytes(profile + "/trace.json")
        let result = try runPhatgoose(["profile", "--library", profile + "/trace.json", "--out", profile, "--duration", "0.5", "--warmup", "0", "--progress", "none"])
        #expect(result.status == 1 && result.stderr.contains("--out: expected a path that is not an input"), "\(result.stderr)")
        #expect(try Self.bytes(profile + "/trace.json") == packed)
    }

    @Test("SIGTERM while a staged library of thousands of files is being written leaves nothing behind")
    func interruptedStagedDirectory() throws {
        let directory = TemporaryDirectory()
        let process = Process()
        process.executableURL = URL(fileURLWithPath: phatgooseBinary)
        process.arguments = ["synth", "--out", directory.file("big"), "--experts", "4000", "--layer", "m:8:8", "--rank", "1"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        // Wait until the staging directory holds a few thousand files (more than the cleanup registry has slots, if
        // each file took one), then interrupt.
        var staged = 0
        while process.isRunning {
            if let stage = try? FileManager.default.contentsOfDirectory(atPath: directory.path).first(where: { $0.hasPrefix(".big.tmp-") }),
               let experts = try? FileManager.default.contentsOfDirectory(atPath: directory.file(stage)), experts.count >= 2500 {
                staged = experts.count
                kill(process.processIdentifier, SIGTERM)
                break
            }
            usleep(1000)
        }
        process.waitUntilExit()
        #expect(staged >= 2500, "synth finished before it could be interrupted")
        #expect(process.terminationReason == .uncaughtSignal && process.terminationStatus == SIGTERM)
        let left = try FileManager.default.contentsOfDirectory(atPath: directory.path)
        #expect(left.isEmpty, "left behind: \(left)")
    }

    @Test("--version prints the C ABI's version; apply says what it wrote; numeric options take negative values and explain")
    func expectations() throws {
        let header = try String(contentsOfFile: packageRoot + "/include/phatgoose.h", encoding: .utf8)
        let parts = ["MAJOR", "MINOR", "PATCH"].map { part -> String in
            let line = header.split(separator: "\n").first { $0.hasPrefix("#define PHATGOOSE_VERSION_\(part) ") }!
            return String(line.split(separator: " ").last!)
        }
        let version = try runPhatgoose(["--version"])
        #expect(version.status == 0 && version.stdout == parts.joined(separator: ".") + "\n", "\(version.stdout)")

        let (directory, library, input) = try Self.libraryAndInput()
        let output = directory.file("y.safetensors")
        let text = try runPhatgoose(["apply", "--library", library, "--input", input, "--output", output])
        #expect(text.status == 0 && text.stdout.hasPrefix("wrote deltas, experts and weights of ") && text.stdout.hasSuffix(" to \(output)\n"), "\(text.stdout)")
        let json = try runPhatgoose(["apply", "--library", library, "--input", input, "--output", directory.file("z.safetensors"), "--format", "json"])
        let document = try JSONParser.parse(Array(json.stdout.utf8))
        guard case let .string(written)? = document["output"], case let .number(modules)? = document["modules"] else {
            Issue.record("apply --format json: \(json.stdout)")
            return
        }
        let moduleCount = try SafetensorsFile(path: input).tensors.count
        #expect(written == directory.file("z.safetensors") && modules.int64 == Int64(moduleCount))

        for (arguments, expected) in [
            (["apply", "--library", library, "--input", input, "--output", output, "--top-k", "-1"], "--top-k: expected an integer >= 1, found -1"),
            (["synth", "--out", directory.file("s"), "--experts", "-3"], "--experts: expected at least 1, found -3"),
            (["synth", "--out", directory.file("s"), "--coverage", "2"], "--coverage: expected a fraction in (0, 1], found 2.0"),
            (["import-official", "x.pt", "--out", directory.file("i"), "--top-k", "0"], "--top-k: expected an integer >= 1, found 0"),
        ] {
            let result = try runPhatgoose(arguments)
            #expect(result.status == 2, "\(arguments)")
            #expect(result.stderr.contains(expected), "\(arguments): \(result.stderr)")
        }
    }
}
