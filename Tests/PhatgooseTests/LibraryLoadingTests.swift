import Foundation
import PhatgooseFormats
import PhatgooseLibrary
import Testing

/// A way to break a valid library, and a fragment its error must contain.
struct BrokenLibrary: CustomTestStringConvertible, Sendable {
    let name: String
    let expected: String
    let breakIt: @Sendable (inout LibraryFixture, String) -> Void
    var testDescription: String { name }
}

let q = "encoder.block.0.layer.0.SelfAttention.q"
let wo = "encoder.block.0.layer.1.DenseReluDense.wo"
typealias Expert = LibraryFixture.Expert

let brokenLibraries: [BrokenLibrary] = [
    BrokenLibrary(name: "lora_A without lora_B", expected: "expert \"e1\", module \(q): expected lora_B with lora_A, found lora_A only") { f, _ in
        f.experts[1].adapter[Expert.bKey(q)] = nil
    },
    BrokenLibrary(name: "lora_B without lora_A", expected: "module \(wo): expected lora_A with lora_B, found lora_B only") { f, _ in
        f.experts[0].adapter[Expert.aKey(wo)] = nil
    },
    BrokenLibrary(name: "module without a gate", expected: "gates.safetensors: expert \"e2\", module \(q): expected a gate vector for the module, found none") { f, _ in
        f.experts[2].gates[q] = nil
    },
    BrokenLibrary(name: "gate without a module", expected: "gate 'decoder.block.0.layer.0.SelfAttention.k': expected a gate only for a module the adapter holds") { f, _ in
        f.experts[0].gates["decoder.block.0.layer.0.SelfAttention.k"] = .init(shape: [16], values: [Float](repeating: 0.1, count: 16))
    },
    BrokenLibrary(name: "gate length not the input width", expected: "expected shape [24] (the module's input width), found [16]") { f, _ in
        f.experts[1].gates[wo] = .init(shape: [16], values: [Float](repeating: 0.1, count: 16))
    },
    BrokenLibrary(name: "rank of A disagrees with the config", expected: "expected rank 4 from adapter_config.json, found lora_A [3, 16] and lora_B [16, 4]") { f, _ in
        f.experts[0].adapter[Expert.aKey(q)] = .init(shape: [3, 16], values: [Float](repeating: 0.1, count: 48))
    },
    BrokenLibrary(name: "rank of B disagrees with the config", expected: "expected rank 4 from adapter_config.json, found lora_A [4, 16] and lora_B [16, 5]") { f, _ in
        f.experts[0].adapter[Expert.bKey(q)] = .init(shape: [16, 5], values: [Float](repeating: 0.1, count: 80))
    },
    BrokenLibrary(name: "rank_pattern disagrees with the tensors", expected: "expected rank 8 from adapter_config.json") { f, _ in
        f.experts[0].config["rank_pattern"] = #"{"q": 8}"#
    },
    BrokenLibrary(name: "r = 0", expected: "field \"r\": expected a rank >= 1, found 0") { f, _ in
        f.experts[1].config["r"] = "0"
    },
    BrokenLibrary(name: "r negative", expected: "field \"r\": expected a rank >= 1, found -4") { f, _ in
        f.experts[1].config["r"] = "-4"
    },
    BrokenLibrary(name: "r of the wrong type", expected: "field \"r\": expected an integer, found a string") { f, _ in
        f.experts[1].config["r"] = "\"4\""
    },
    BrokenLibrary(name: "lora_alpha of the wrong type", expected: "field \"lora_alpha\": expected a finite number, found a boolean") { f, _ in
        f.experts[0].config["lora_alpha"] = "true"
    },
    BrokenLibrary(name: "use_rslora of the wrong type", expected: "field \"use_rslora\": expected true or false, found the integer 1") { f, _ in
        f.experts[0].config["use_rslora"] = "1"
    },
    BrokenLibrary(name: "target_modules of the wrong type", expected: "field \"target_modules\": expected null, a string or a list of strings, found the integer 3") { f, _ in
        f.experts[0].config["target_modules"] = "3"
    },
    BrokenLibrary(name: "target_modules not covering a module", expected: "field \"target_modules\": expected it to select module \(wo)") { f, _ in
        f.experts[0].config["target_modules"] = #"["q"]"#
    },
    BrokenLibrary(name: "config not JSON", expected: "adapter_config.json: expected JSON, found invalid JSON") { f, _ in
        f.experts[0].configText = "{r: 4}"
    },
    BrokenLibrary(name: "widths of one module differ between experts", expected: "expert \"e2\", module \(q): expected in 16, out 16 as expert \"e0\" has, found in 16, out 12") { f, _ in
        f.experts[2].adapter[Expert.bKey(q)] = .init(shape: [12, 4], values: [Float](repeating: 0.1, count: 48))
    },
    BrokenLibrary(name: "NaN in a gate", expected: "tensor '\(q)': expected finite values, found 1 NaN or infinite") { f, _ in
        f.experts[1].gates[q]!.values[3] = .nan
    },
    BrokenLibrary(name: "infinity in lora_B", expected: "expected finite values, found 2 NaN or infinite") { f, _ in
        f.experts[0].adapter[Expert.bKey(wo)]!.values[0] = .infinity
        f.experts[0].adapter[Expert.bKey(wo)]!.values[5] = -.infinity
    },
    BrokenLibrary(name: "BF16 NaN in lora_A", expected: "expected finite values, found 1 NaN or infinite") { f, _ in
        f.experts[0].adapter[Expert.aKey(q)]!.dtype = .bf16
        f.experts[0].adapter[Expert.aKey(q)]!.values[7] = .nan
    },
    BrokenLibrary(name: "DoRA magnitude vector", expected: "found a DoRA magnitude vector") { f, _ in
        f.experts[0].adapter["base_model.model.\(q).lora_magnitude_vector"] = .init(shape: [16], values: [Float](repeating: 1, count: 16))
    },
    BrokenLibrary(name: "LoRA bias", expected: "found a bias") { f, _ in
        f.experts[0].adapter["base_model.model.\(q).lora_B.bias"] = .init(shape: [16], values: [Float](repeating: 1, count: 16))
    },
    BrokenLibrary(name: "modules_to_save weight", expected: "found a modules_to_save weight") { f, _ in
        f.experts[0].adapter["base_model.model.lm_head.modules_to_save.default.weight"] = .init(shape: [2, 2], values: [1, 2, 3, 4])
    },
    BrokenLibrary(name: "unknown tensor", expected: "tensor 'base_model.model.\(q).scaling': expected only base_model.model.<module>.lora_A.weight and .lora_B.weight, found an unknown tensor, which PHATGOOSE routing would ignore") { f, _ in
        f.experts[0].adapter["base_model.model.\(q).scaling"] = .init(shape: [1], values: [1])
    },
    BrokenLibrary(name: "tensor outside base_model.model", expected: "found a key outside \"base_model.model.\"") { f, _ in
        f.experts[0].adapter["encoder.weight"] = .init(shape: [1], values: [1])
    },
    BrokenLibrary(name: "use_dora in the config", expected: "field \"use_dora\": expected false, found true") { f, _ in
        f.experts[0].config["use_dora"] = "true"
    },
    BrokenLibrary(name: "trained biases in the config", expected: "field \"bias\": expected \"none\", found \"all\"") { f, _ in
        f.experts[0].config["bias"] = "\"all\""
    },
    BrokenLibrary(name: "modules_to_save in the config", expected: "field \"modules_to_save\": expected null or an empty list, found 1 modules") { f, _ in
        f.experts[0].config["modules_to_save"] = #"["lm_head"]"#
    },
    BrokenLibrary(name: "manifest naming a missing expert", expected: "library.json: expert \"ghost\": expected a directory at \"ghost\", found none") { f, _ in
        f.manifest = #"{"format":"phatgoose-library","version":1,"experts":[{"name":"e0","path":"e0"},{"name":"ghost","path":"ghost"}]}"#
    },
    BrokenLibrary(name: "manifest naming an expert twice", expected: "field \"experts[1].name\": expected unique names, found \"e0\" twice") { f, _ in
        f.manifest = #"{"format":"phatgoose-library","version":1,"experts":[{"name":"e0","path":"e0"},{"name":"e0","path":"e1"}]}"#
    },
    BrokenLibrary(name: "manifest path leaving the library", expected: "expected a relative path inside the library directory, found \"../e0\"") { f, _ in
        f.manifest = #"{"format":"phatgoose-library","version":1,"experts":[{"name":"e0","path":"../e0"}]}"#
    },
    BrokenLibrary(name: "manifest absolute path", expected: "expected a relative path inside the library directory, found \"/etc\"") { f, _ in
        f.manifest = #"{"format":"phatgoose-library","version":1,"experts":[{"name":"e0","path":"/etc"}]}"#
    },
    BrokenLibrary(name: "manifest path through a symlink out of the library", expected: "expected a path inside the library directory, found \"link\" leading outside it") { f, root in
        f.manifest = #"{"format":"phatgoose-library","version":1,"experts":[{"name":"e0","path":"link"}]}"#
        try? FileManager.default.createSymbolicLink(atPath: root + "/link", withDestinationPath: "/tmp")
    },
    BrokenLibrary(name: "manifest with no experts", expected: "field \"experts\": expected at least one expert, found an empty list") { f, _ in
        f.manifest = #"{"format":"phatgoose-library","version":1,"experts":[]}"#
    },
    BrokenLibrary(name: "manifest top_k < 1", expected: "field \"routing.top_k\": expected an integer >= 1, found 0") { f, _ in
        f.manifest = #"{"format":"phatgoose-library","version":1,"experts":[{"name":"e0","path":"e0"}],"routing":{"top_k":0}}"#
    },
    BrokenLibrary(name: "manifest unknown router", expected: "field \"routing.router\": expected one of") { f, _ in
        f.manifest = #"{"format":"phatgoose-library","version":1,"experts":[{"name":"e0","path":"e0"}],"routing":{"router":"moe"}}"#
    },
    BrokenLibrary(name: "manifest wrong format", expected: "field \"format\": expected \"phatgoose-library\", found \"lib\"") { f, _ in
        f.manifest = #"{"format":"lib","version":1,"experts":[{"name":"e0","path":"e0"}]}"#
    },
    BrokenLibrary(name: "manifest wrong version", expected: "field \"version\": expected 1, found the integer 2") { f, _ in
        f.manifest = #"{"format":"phatgoose-library","version":2,"experts":[{"name":"e0","path":"e0"}]}"#
    },
    BrokenLibrary(name: "no manifest and no experts", expected: "expected library.json or expert subdirectories holding adapter_config.json, found neither") { f, _ in
        f.manifest = nil
        f.experts = []
    },
]

@Suite("expert library loading")
struct LibraryLoadingTests {
    @Test("refuses broken libraries, naming the file, expert and module", arguments: brokenLibraries)
    func refusesBroken(_ broken: BrokenLibrary) throws {
        let directory = TemporaryDirectory()
        let root = directory.file("lib")
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        var fixture = LibraryFixture.standard()
        broken.breakIt(&fixture, root)
        fixture.write(to: root)
        let message = try #require(errorMessage { _ = try ExpertLibrary.load(path: root) })
        #expect(message.contains(broken.expected), "message: \(message)")
        #expect(message.hasPrefix(root), "the message names the file: \(message)")
    }

    @Test("loads a valid library: experts in manifest order, widths, ranks, scales, gates")
    func loadsValid() throws {
        let directory = TemporaryDirectory()
        var fixture = LibraryFixture.standard()
        fixture.experts[1].config["use_rslora"] = "true"
        fixture.experts[2].config["alpha_pattern"] = #"{"SelfAttention\\.q": 2, "q": 3}"#
        fixture.write(to: directory.path)
        let library = try ExpertLibrary.load(path: directory.path)
        #expect(library.experts.map(\.name) == ["e0", "e1", "e2"])
        #expect(library.modules.map(\.name) == [q, wo])
        let module = try #require(library.module(named: wo))
        #expect(module.inWidth == 24 && module.outWidth == 16)
        #expect(module.experts.map(\.expert.int) == [0, 1, 2])
        #expect(module.experts.map(\.scale) == [2, 4, 2])  // 8/4, 8/sqrt(4), 8/4
        // The first alpha_pattern key that matches wins (PEFT's rule): "SelfAttention\.q" before "q".
        #expect(library.module(named: q)!.experts.map(\.scale) == [2, 4, 0.5])
        #expect(module.gateMatrix.shape == [3, 24])
        // lora_B is stored transposed: Bt[j, o] == B[o, j].
        let b = fixture.experts[0].adapter[Expert.bKey(wo)]!.values
        let bt = module.experts[0].bTransposed.floats()
        var transposed = true
        for o in 0..<16 {
            for j in 0..<4 where bt[j * 16 + o] != b[o * 4 + j] { transposed = false }
        }
        #expect(transposed)
    }

    @Test("without a manifest, experts are subdirectories with adapter_config.json in byte order")
    func directoryScan() throws {
        let directory = TemporaryDirectory()
        var fixture = LibraryFixture.standard()
        fixture.manifest = nil
        fixture.experts[0].name = "b"
        fixture.experts[1].name = "B"
        fixture.experts[2].name = "a"
        fixture.write(to: directory.path)
        try FileManager.default.createDirectory(atPath: directory.file("not-an-expert"), withIntermediateDirectories: true)
        let library = try ExpertLibrary.load(path: directory.path)
        #expect(library.experts.map(\.name) == ["B", "a", "b"])
        #expect(library.routing == RoutingDefaults(router: .phatgoose, topK: 2))
    }

    @Test("an expert that does not adapt a module is not a candidate there")
    func skippedModules() throws {
        let directory = TemporaryDirectory()
        var fixture = LibraryFixture.standard()
        fixture.experts[1].adapter[Expert.aKey(wo)] = nil
        fixture.experts[1].adapter[Expert.bKey(wo)] = nil
        fixture.experts[1].gates[wo] = nil
        fixture.write(to: directory.path)
        let library = try ExpertLibrary.load(path: directory.path)
        #expect(library.module(named: wo)!.experts.map(\.expert.int) == [0, 2])
        #expect(library.module(named: q)!.experts.map(\.expert.int) == [0, 1, 2])
    }

    @Test("PEFT pattern rule: (.*\\.)?(KEY)$ over the whole module name, first key in file order")
    func patternRule() throws {
        let config = try AdapterConfig(document: JSONParser.parse(Array(#"{"r": 8, "lora_alpha": 16, "rank_pattern": {"layer\\.1\\..*wo": 4, "o": 2}, "alpha_pattern": {"q": 1}}"#.utf8)), file: "cfg")
        #expect(config.rank(for: "encoder.block.0.layer.1.DenseReluDense.wo") == 4)
        #expect(config.rank(for: "encoder.block.0.layer.0.SelfAttention.o") == 2)
        #expect(config.rank(for: "encoder.block.0.layer.0.SelfAttention.qo") == 8, "a key must follow a dot or start the name")
        #expect(config.rank(for: "o") == 2)
        #expect(config.alpha(for: "x.q") == 1 && config.alpha(for: "x.k") == 16)
        #expect(config.scale(for: "x.q") == 1.0 / 8)
    }

    @Test("model order: numbers numerically, encoder before decoder, q k v o")
    func moduleOrder() {
        let names = ["decoder.block.0.x", "encoder.block.10.a", "encoder.block.2.layer.0.SelfAttention.v",
                     "encoder.block.2.layer.0.SelfAttention.q", "encoder.block.2.layer.0.SelfAttention.o"]
        #expect(ModuleOrder.sorted(names) == ["encoder.block.2.layer.0.SelfAttention.q", "encoder.block.2.layer.0.SelfAttention.v",
                                              "encoder.block.2.layer.0.SelfAttention.o", "encoder.block.10.a", "decoder.block.0.x"])
    }
}
