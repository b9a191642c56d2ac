import APIModels
import FerryClient
import FerryTestSupport
import Foundation
import Testing

/// Real answers of a running Ferry, checked against `docs/openapi.yaml`: every status is one the
/// document lists for the endpoint, every 2xx body validates against the response schema (with
/// every object closed, so a member Ferry sends must be documented), every error body is
/// Cloud Hypervisor's array of strings. The validation is Python's jsonschema over the YAML.
@Suite(.enabled(if: Repository.kvmAvailable, needsKVM),
       .enabled(if: OpenAPIValidator.available, "needs /usr/bin/python3 with yaml and jsonschema (Debian: python3-yaml, python3-jsonschema)"))
struct OpenAPIResponseTests {
    /// One answer: the endpoint, its status, and its body as the VMM sent it (absent for 204).
    struct Answer {
        var path: String
        var method: String
        var status: String
        var body: Any?

        var document: [String: Any] {
            ["path": path, "method": method, "status": status, "body": body ?? NSNull()]
        }
    }

    /// Calls `endpoint` and records what came back.
    static func record(_ endpoint: Endpoint, _ body: String? = nil, on api: APIClient, into answers: inout [Answer]) async {
        var answer = Answer(path: "/\(endpoint.rawValue)", method: endpoint.method.rawValue.lowercased(), status: "", body: nil)
        do {
            let data = try await api.send(endpoint, body: body.map { Data($0.utf8) })
            answer.status = data.isEmpty ? "204" : "200"
            answer.body = data.isEmpty ? nil : try? JSONSerialization.jsonObject(with: data)
        } catch let error as APIError {
            answer.status = "\(error.status)"
            answer.body = error.messages
        } catch {
            answer.status = "no answer: \(error)"
        }
        answers.append(answer)
    }

    @Test func realAnswersMatchTheDocument() async throws {
        let directory = try TemporaryDirectory()
        let kernel = try TestGuest.path.get()
        let source = try await TestVMM("source", in: directory)
        var answers: [Answer] = []
        let api = source.api
        await Self.record(.vmmPing, on: api, into: &answers)
        await Self.record(.vmInfo, on: api, into: &answers)
        await Self.record(.vmMigrationProgress, on: api, into: &answers)
        await Self.record(.vmBoot, on: api, into: &answers)
        await Self.record(.vmCreate, #"{"payload": {"kernel": 3}}"#, on: api, into: &answers)

        // A VM with every device and console kind vm.info describes.
        let devices = try TestGuestVM.Devices(in: directory)
        let config = #"{"cpus": {"boot_vcpus": 2, "max_vcpus": 2}, "memory": {"size": 268435456}, "payload": {"kernel": "\#(kernel)", "cmdline": "workset_mib=4 heartbeat_ms=200"}, "serial": {"mode": "Pty"}, "console": {"mode": "File", "file": "\#(devices.consolePath)"}, "disks": [{"path": "\#(devices.diskPath)", "id": "disk0"}], "rng": {"src": "/dev/urandom"}}"#
        await Self.record(.vmCreate, config, on: api, into: &answers)
        await Self.record(.vmInfo, on: api, into: &answers)
        await Self.record(.vmPause, on: api, into: &answers)
        await Self.record(.vmBoot, on: api, into: &answers)
        await Self.record(.vmInfo, on: api, into: &answers)
        // The NMI below must find the guest's interrupt table in place, as on any machine.
        let serial = try TerminalClient(path: try #require(try await source.info().config.serial?.file))
        #expect(try await serial.read(until: "HEARTBEAT cpu=1 ", timeout: .seconds(60)), "\(serial.received)")
        await Self.record(.vmCounters, on: api, into: &answers)
        await Self.record(.vmNmi, on: api, into: &answers)
        await Self.record(.vmPowerButton, on: api, into: &answers)
        await Self.record(.vmAddNet, #"{"tap": "t0"}"#, on: api, into: &answers)
        await Self.record(.vmPause, on: api, into: &answers)
        await Self.record(.vmInfo, on: api, into: &answers)
        await Self.record(.vmResume, on: api, into: &answers)
        await Self.record(.vmCancelMigration, on: api, into: &answers)

        #expect(try await source.info().state == "Running",
                "\(answers.map { "\($0.path) \($0.status)" }); \(source.events().suffix(6).map(\.name)); \(source.process.standardError.suffix(800))")

        // A migration, for the progress document on both sides.
        let destination = try await TestVMM("destination", in: directory)
        let receive = try await destination.startReceive(at: "unix:\(directory.path("migration.sock"))",
                                                         serial: VmConfig.Console(mode: "Socket", socket: directory.path("serial.sock")),
                                                         disks: [.init(id: "disk0", path: devices.diskPath)])
        let id = try await source.startSend(to: receive.url, keepAlive: true)
        #expect(try await source.waitForEvent(["vm.migration-finished"], id: id).name == "vm.migration-finished")
        #expect(await receive.outcome() == nil)
        await Self.record(.vmMigrationProgress, on: api, into: &answers)
        await Self.record(.vmMigrationProgress, on: destination.api, into: &answers)
        await Self.record(.vmInfo, on: destination.api, into: &answers)
        await Self.record(.vmDelete, on: api, into: &answers)
        await Self.record(.vmDelete, on: api, into: &answers)

        #expect(answers.allSatisfy { !$0.status.hasPrefix("no answer") }, "\(answers.map(\.status))")
        let file = directory.path("answers.json")
        try JSONSerialization.data(withJSONObject: answers.map(\.document)).write(to: URL(fileURLWithPath: file))
        let failures = try await offThePool { try OpenAPIValidator.check(answersIn: file) }
        #expect(failures.isEmpty, "\(failures)")
        #expect(await destination.shutDown())
        #expect(await source.shutDown())
    }
}

/// Checks recorded answers against `docs/openapi.yaml` with Debian's python3-yaml and
/// python3-jsonschema.
enum OpenAPIValidator {
    static let python = "/usr/bin/python3"

    static let available: Bool = {
        (try? runTool(python, ["-c", "import yaml, jsonschema"])) != nil
    }()

    static let program = """
        import json, sys, yaml, jsonschema
        document = yaml.safe_load(open(sys.argv[1]))
        answers = json.load(open(sys.argv[2]))
        def close(node):
            # Every documented object is closed: a member the document does not list is an error.
            if isinstance(node, dict):
                if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                    node["additionalProperties"] = False
                for value in node.values():
                    close(value)
            elif isinstance(node, list):
                for value in node:
                    close(value)
        close(document["components"])
        failures = []
        for answer in answers:
            where = "%s %s -> %s" % (answer["method"].upper(), answer["path"], answer["status"])
            operation = document["paths"].get(answer["path"], {}).get(answer["method"])
            if operation is None:
                failures.append(where + ": the document has no such operation")
                continue
            response = operation["responses"].get(answer["status"])
            if response is None:
                failures.append(where + ": the document does not list this status")
                continue
            body = answer.get("body")
            schema = response.get("content", {}).get("application/json", {}).get("schema")
            if not answer["status"].startswith("2"):
                # Errors: Cloud Hypervisor's array of strings (the document's general contract).
                if not (isinstance(body, list) and body and all(isinstance(item, str) for item in body)):
                    failures.append(where + ": the error body is not an array of strings: %r" % (body,))
                continue
            if schema is None:
                if body is not None:
                    failures.append(where + ": a body the document does not describe")
                continue
            try:
                jsonschema.validate(body, dict(schema, components=document["components"]))
            except jsonschema.ValidationError as error:
                path = "/".join(str(part) for part in error.absolute_path)
                failures.append("%s: %s (at %s)" % (where, error.message, path or "the top"))
        print("\\n".join(failures))
        """

    /// The answers in the JSON file `path` that do not match the document, one line each.
    static func check(answersIn path: String) throws -> [String] {
        let document = Repository.root.appendingPathComponent("docs/openapi.yaml").path
        let output = try runTool(python, ["-c", program, document, path])
        return output.split(separator: "\n").map(String.init).filter { !$0.isEmpty }
    }
}
