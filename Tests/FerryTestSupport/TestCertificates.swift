import Foundation

/// Certificate authorities and the certificates they sign, for migration TLS tests, made with the
/// `openssl` command in a directory of their own (P-256 keys: quick to make).
public struct TestCertificates: Sendable {
    public let directory: String

    public init(in directory: String) throws {
        self.directory = directory
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }

    /// A self-signed CA named `name`, valid for 30 days.
    public func authority(_ name: String) throws -> Authority {
        let authority = Authority(certificate: path("\(name).pem"), key: path("\(name).key"))
        try openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                     "-keyout", authority.key, "-out", authority.certificate, "-days", "30", "-subj", "/CN=\(name)"])
        return authority
    }

    /// A certificate for `name` that `authority` signs, naming `subjectAltNames` (e.g.
    /// `IP:127.0.0.1`), for both TLS server and client use. `expired`: its validity ended yesterday.
    public func issue(_ name: String, by authority: Authority, subjectAltNames: [String] = ["IP:127.0.0.1", "DNS:localhost"],
                      expired: Bool = false) throws -> Issued {
        let issued = Issued(certificate: path("\(name).pem"), key: path("\(name).key"))
        let request = path("\(name).csr")
        let extensions = path("\(name).ext")
        try openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                     "-keyout", issued.key, "-out", request, "-subj", "/CN=\(name)"])
        try Data("""
            basicConstraints=CA:FALSE
            keyUsage=digitalSignature
            extendedKeyUsage=serverAuth,clientAuth
            subjectAltName=\(subjectAltNames.joined(separator: ","))

            """.utf8).write(to: URL(fileURLWithPath: extensions))
        try openssl(["x509", "-req", "-in", request, "-CA", authority.certificate, "-CAkey", authority.key,
                     "-set_serial", "\(UInt32.random(in: 1...UInt32.max))", "-days", expired ? "-1" : "30",
                     "-extfile", extensions, "-out", issued.certificate])
        return issued
    }

    /// A `tls_dir` as Cloud Hypervisor lays it out: `ca-cert.pem` (the CA this side trusts) and
    /// this side's certificate and key, `client-*` for a sender and `server-*` for a receiver.
    public func tlsDirectory(_ name: String, sender: Bool, trusting authority: Authority, presenting issued: Issued) throws -> String {
        let directory = path(name)
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let prefix = sender ? "client" : "server"
        for (source, target) in [(authority.certificate, "ca-cert.pem"), (issued.certificate, "\(prefix)-cert.pem"),
                                 (issued.key, "\(prefix)-key.pem")] {
            try FileManager.default.copyItem(atPath: source, toPath: "\(directory)/\(target)")
        }
        return directory
    }

    public struct Authority: Sendable {
        public let certificate: String
        public let key: String
    }

    public struct Issued: Sendable {
        public let certificate: String
        public let key: String
    }

    private func path(_ name: String) -> String { "\(directory)/\(name)" }

    private func openssl(_ arguments: [String]) throws {
        try runTool("/usr/bin/openssl", arguments)
    }
}
