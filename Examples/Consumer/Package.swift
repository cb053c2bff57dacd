// swift-tools-version: 6.1
import PackageDescription

// A minimal package that uses Phatgoose as a dependency, by path, through its public products only. CI builds and
// runs it (.ci/run) to prove the package works as a dependency: no unsafe flags, public API enough to serve.
let package = Package(
    name: "PhatgooseConsumer",
    dependencies: [
        .package(name: "Phatgoose", path: "../.."),
    ],
    targets: [
        .executableTarget(
            name: "PhatgooseConsumer",
            dependencies: [
                .product(name: "Phatgoose", package: "Phatgoose"),
                .product(name: "PhatgooseSynth", package: "Phatgoose"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
