// swift-tools-version: 6.1
import PackageDescription

// libFuzzer targets over the readers that take untrusted bytes. Build and run with Fuzz/run.sh, which passes
// -sanitize=fuzzer,address (flags that must stay out of the main package, which others depend on).
let package = Package(
    name: "PhatgooseFuzz",
    dependencies: [.package(name: "Phatgoose", path: "../")],
    targets: [
        .target(name: "CFuzzDriver"),
        .executableTarget(name: "FuzzSafetensors", dependencies: ["CFuzzDriver", .product(name: "Phatgoose", package: "Phatgoose")]),
        .executableTarget(name: "FuzzAdapterConfig", dependencies: ["CFuzzDriver", .product(name: "Phatgoose", package: "Phatgoose")]),
        .executableTarget(name: "FuzzManifest", dependencies: ["CFuzzDriver", .product(name: "Phatgoose", package: "Phatgoose")]),
        .executableTarget(name: "FuzzPacked", dependencies: ["CFuzzDriver", .product(name: "Phatgoose", package: "Phatgoose")]),
        .executableTarget(name: "FuzzTorchCheckpoint", dependencies: ["CFuzzDriver", .product(name: "Phatgoose", package: "Phatgoose")]),
    ],
    swiftLanguageModes: [.v6]
)
