// swift-tools-version: 6.1
import PackageDescription

// Layering (see docs/architecture.md):
//   CPhatgooseKernels  C: AVX2/FMA kernels with a portable fallback, chosen at run time
//   PhatgooseFormats   JSON, safetensors, PEFT config, manifest, packed format (pure)
//   PhatgooseKernels   Swift face of the C kernels (pure)
//   PhatgooseLibrary   the in-memory expert library: loading, validation, packing (pure)
//   PhatgooseRouting   routers, dispatch plan, single-threaded executor (pure)
//   PhatgooseRuntime   the only module that may own threads
//   PhatgooseSynth     synthetic libraries and activations
//   phatgoose          the command-line tool
//   CPhatgoose         C: include/phatgoose.h (the C ABI) and its plain-C parts (versions, per-thread errors)
//   PhatgooseC         the C ABI in Swift (`@c @implementation`, checked against the header); product PhatgooseC
//                      is libPhatgooseC.so, installed as libphatgoose.so by scripts/install.sh (a product named
//                      `phatgoose` would collide with the executable's)
// No target uses unsafe flags, so the products build as a dependency of other packages.

let package = Package(
    name: "Phatgoose",
    products: [
        .library(
            name: "Phatgoose",
            targets: ["PhatgooseFormats", "PhatgooseKernels", "PhatgooseLibrary", "PhatgooseRouting", "PhatgooseRuntime"]
        ),
        .library(name: "PhatgooseSynth", targets: ["PhatgooseSynth"]),
        .executable(name: "phatgoose", targets: ["phatgoose"]),
        .library(name: "PhatgooseC", type: .dynamic, targets: ["PhatgooseC"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
    ],
    targets: [
        .target(name: "CPhatgooseKernels"),
        .target(name: "CPhatgooseSystem"),
        .systemLibrary(name: "CNuma", providers: [.apt(["libnuma-dev"])]),
        .target(name: "PhatgooseFormats", dependencies: ["CPhatgooseKernels"]),
        .target(name: "PhatgooseKernels", dependencies: ["CPhatgooseKernels", "PhatgooseFormats"]),
        .target(name: "PhatgooseLibrary", dependencies: ["PhatgooseFormats", "PhatgooseKernels"]),
        .target(
            name: "PhatgooseRouting",
            dependencies: ["PhatgooseFormats", "PhatgooseKernels", "PhatgooseLibrary"],
            // O(n) invariant checks of the dispatch plan compile into debug builds (the tests) only.
            swiftSettings: [.define("PHATGOOSE_CHECK_INVARIANTS", .when(configuration: .debug))]
        ),
        .target(
            name: "PhatgooseRuntime",
            dependencies: ["CNuma", "CPhatgooseSystem", "PhatgooseFormats", "PhatgooseKernels", "PhatgooseRouting", "PhatgooseLibrary"]
        ),
        .target(name: "PhatgooseSynth", dependencies: ["PhatgooseFormats", "PhatgooseKernels", "PhatgooseLibrary"]),
        .target(name: "CPhatgoose"),
        .target(name: "PhatgooseC", dependencies: ["CPhatgoose", "PhatgooseFormats", "PhatgooseLibrary", "PhatgooseRouting", "PhatgooseRuntime"]),
        .executableTarget(
            name: "phatgoose",
            dependencies: [
                "PhatgooseFormats", "PhatgooseKernels", "PhatgooseLibrary", "PhatgooseRouting", "PhatgooseRuntime", "PhatgooseSynth",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(
            name: "PhatgooseTests",
            dependencies: [
                "CPhatgooseKernels", "PhatgooseFormats", "PhatgooseKernels", "PhatgooseLibrary", "PhatgooseRouting",
                "PhatgooseRuntime", "PhatgooseSynth",
            ],
            swiftSettings: [.define("PHATGOOSE_CHECK_INVARIANTS")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
