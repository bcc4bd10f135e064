# frozen_string_literal: true

require "spec_helper"
require "socket"

# Interop of the unary RPCs against a server built with the official grpc gem from the
# same .proto files: every RPC, every field, errors, metadata, deadlines, argument checks.
RSpec.describe "Flowctl clients: unary calls against the official grpc gem" do
  Official.load!
  cp = Obsrvr::Flow::Controlplane

  before(:all) do
    Official.load!
    @seen = Queue.new
    seen = @seen
    @impls = {}
    impls = @impls
    dispatch = lambda do |name|
      lambda do |req, call|
        seen << [name, req, call.metadata.dup, call.deadline]
        impl = impls[name] or raise GRPC::Internal, "no behaviour set for #{name}"
        impl.call(req, call)
      end
    end
    cp_methods = %i[register_processor processor_heartbeat register_source source_heartbeat
                    register_consumer consumer_heartbeat]
    @server = OfficialServer.new
    @port = @server.start(handler_for_controlplane: OfficialServer::Handler.new(**cp_methods.to_h { |m| [m, dispatch.(m)] }),
                          handler_for_processor: OfficialServer::Handler.new(get_capabilities: dispatch.(:get_capabilities)),
                          tls: false)
  end

  after(:all) { @server&.stop }

  before do
    @seen.clear
    @impls.clear
  end

  # under GC_STRESS the in-process server crawls: the 5 s default deadline would expire
  let(:client) { Flowctl::ControlPlane::Client.new("127.0.0.1:#{@port}", tls: false, timeout: ENV["GC_STRESS"] == "1" ? 300 : 5) }

  after { client.close }

  def answer(name, &impl) = @impls[name] = impl

  def last_seen
    OfficialServer.pop(@seen, 5) or raise "the server saw no call"
  end

  describe "register RPCs" do
    %w[processor source consumer].each do |kind|
      it "register_#{kind} sends every field and decodes every field of the reply" do
        answer(:"register_#{kind}") do |req, _call|
          cp.const_get("Register#{kind.capitalize}Response")
            .new("#{kind}_id": "#{req.public_send(:"#{kind}_id")}-ok", success: true, message: "wélcome")
        end
        resp = client.public_send(:"register_#{kind}", "#{kind}_id": "id-1", endpoint: "10.0.0.1:9000",
                                                       metadata: {"zone" => "eu-1", "ü" => "ß"})
        expect(resp).to be_a(Flowctl::ControlPlane.const_get("Register#{kind.capitalize}Response"))
        expect(resp.public_send(:"#{kind}_id")).to eq("id-1-ok")
        expect(resp.success).to be(true)
        expect(resp.message).to eq("wélcome")

        name, req, = last_seen
        expect(name).to eq(:"register_#{kind}")
        expect(req.public_send(:"#{kind}_id")).to eq("id-1")
        expect(req.endpoint).to eq("10.0.0.1:9000")
        expect(req.metadata.to_h).to eq("zone" => "eu-1", "ü" => "ß")
      end

      it "#{kind}_heartbeat sends id, timestamp (to the nanosecond), metrics and status" do
        answer(:"#{kind}_heartbeat") { |_req, _call| cp.const_get("#{kind.capitalize}HeartbeatResponse").new(success: false, message: "unknown") }
        t = Time.at(1_700_000_000, 123_456_789, :nsec)
        req = Flowctl::ControlPlane.const_get("#{kind.capitalize}HeartbeatRequest")
                                   .new("#{kind}_id": "h-1", timestamp: t, metrics: {"cpu" => 0.25, "lag" => -3.0e10}, status: "HEALTHY")
        resp = client.public_send(:"#{kind}_heartbeat", req)
        expect(resp.success).to be(false)
        expect(resp.message).to eq("unknown")

        _, seen, = last_seen
        expect(seen.public_send(:"#{kind}_id")).to eq("h-1")
        expect([seen.timestamp.seconds, seen.timestamp.nanos]).to eq([1_700_000_000, 123_456_789])
        expect(seen.metrics.to_h).to eq("cpu" => 0.25, "lag" => -3.0e10)
        expect(seen.status).to eq("HEALTHY")
      end
    end

    it "sends default (empty) messages and reads default replies" do
      answer(:processor_heartbeat) { |_req, _call| cp::ProcessorHeartbeatResponse.new }
      resp = client.processor_heartbeat
      expect(resp.success).to be(false)
      expect(resp.message).to eq("")
      _, seen, = last_seen
      expect(seen.processor_id).to eq("")
      expect(seen.timestamp).to be_nil
    end

    it "accepts the request as a Hash of fields" do
      answer(:register_source) { |req, _call| cp::RegisterSourceResponse.new(source_id: req.source_id) }
      expect(client.register_source({source_id: "s"}).source_id).to eq("s")
      expect(client.register_source({"source_id" => "t"}).source_id).to eq("t")
    end
  end

  describe "ProcessorService#get_capabilities" do
    it "decodes every field, repeated and int32 included" do
      answer(:get_capabilities) do |_req, _call|
        Obsrvr::Flow::Processor::CapabilitiesResponse.new(
          processor_id: "p", name: "ttp", description: "token transfers", version: "1.2.3",
          input_event_types: %w[ledger tx], output_event_types: ["transfer"], max_concurrent: -7
        )
      end
      pc = Flowctl::Processor::Client.new("127.0.0.1:#{@port}", tls: false)
      caps = pc.get_capabilities
      expect(caps.to_h).to include(processor_id: "p", name: "ttp", description: "token transfers", version: "1.2.3",
                                   input_event_types: %w[ledger tx], output_event_types: ["transfer"], max_concurrent: -7)
      expect(last_seen.first).to eq(:get_capabilities)
    ensure
      pc&.close
    end
  end

  describe "errors" do
    it "raises the Flowctl::RPCError subclass of every status code with details and trailing metadata" do
      (1..16).each do |code|
        answer(:register_consumer) do |_req, _call|
          raise GRPC::BadStatus.new_status_exception(code, "details #{code}", {"code" => code.to_s, "blob-bin" => "\x00\xFF".b})
        end
        expect { client.register_consumer(consumer_id: "c") }.to raise_error(Flowctl::RPCError.for_code(code)) { |e|
          expect(e.code).to eq(code)
          expect(e.details).to eq("details #{code}")
          expect(e.metadata).to include("code" => code.to_s, "blob-bin" => "\x00\xFF".b)
          expect(e).to be_a(Flowctl::RPCError)
          expect(e).to be_a(Flowctl::Error)
        }
      end
      expect(Flowctl::RPCError.for_code(5)).to eq(Flowctl::NotFound)
    end

    it "turns a handler's plain exception into Flowctl::Unknown" do
      answer(:source_heartbeat) { |_req, _call| raise "kaboom" }
      expect { client.source_heartbeat }.to raise_error(Flowctl::Unknown)
    end

    it "raises Flowctl::Unimplemented for a service the server does not have" do
      other = OfficialServer.new
      port = other.start(handler_for_controlplane: OfficialServer::EchoControlPlane.new, tls: false)
      pc = Flowctl::Processor::Client.new("127.0.0.1:#{port}", tls: false)
      expect { pc.get_capabilities }.to raise_error(Flowctl::Unimplemented)
    ensure
      pc&.close
      other&.stop
    end

    it "raises Flowctl::Unavailable when nothing listens" do
      port = TCPServer.open("127.0.0.1", 0) { |s| s.addr[1] }
      c = Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false, timeout: 5)
      expect { c.register_processor(processor_id: "x") }.to raise_error(Flowctl::Unavailable)
    ensure
      c&.close
    end

    it "keeps serving after errors" do
      answer(:register_processor) { |_req, _call| raise GRPC::AlreadyExists, "dup" }
      3.times { expect { client.register_processor }.to raise_error(Flowctl::AlreadyExists) }
      answer(:register_processor) { |_req, _call| cp::RegisterProcessorResponse.new(success: true) }
      expect(client.register_processor.success).to be(true)
    end
  end

  describe "headers (gRPC metadata)" do
    before { answer(:processor_heartbeat) { |_req, _call| cp::ProcessorHeartbeatResponse.new(success: true) } }

    it "sends client and per-call headers, per-call winning, -bin values binary" do
      c = Flowctl::ControlPlane::Client.new("127.0.0.1:#{@port}", tls: false,
                                            headers: {"x-client" => "c", "x-both" => "client", trace: "t"})
      bin = (0..255).map(&:chr).join.b
      c.processor_heartbeat(processor_id: "p", headers: {"x-both" => "call", "x-data-bin" => bin, "x-multi" => %w[a b]})
      _, _, md, = last_seen
      expect(md).to include("x-client" => "c", "x-both" => "call", "trace" => "t", "x-data-bin" => bin)
      expect(md["x-multi"]).to eq(%w[a b]).or eq("a,b")
    ensure
      c&.close
    end

    it "keeps `metadata:` the message field, never gRPC metadata" do
      answer(:register_processor) { |_req, _call| cp::RegisterProcessorResponse.new(success: true) }
      client.register_processor(processor_id: "p", metadata: {"x-field" => "v"}, headers: {"x-header" => "h"})
      _, req, md, = last_seen
      expect(req.metadata.to_h).to eq("x-field" => "v")
      expect(md).to include("x-header" => "h")
      expect(md).not_to include("x-field")
    end

    it "returns the server's initial and trailing metadata through #invoke" do
      answer(:source_heartbeat) do |_req, call|
        call.merge_metadata_to_send("x-initial" => "i")
        call.output_metadata["x-trailing"] = "t"
        cp::SourceHeartbeatResponse.new(success: true)
      end
      reply = client.invoke(:source_heartbeat, source_id: "s", headers: {"a" => "b"})
      expect(reply.response).to eq(Flowctl::ControlPlane::SourceHeartbeatResponse.new(success: true))
      expect(reply.initial_metadata).to include("x-initial" => "i")
      expect(reply.trailing_metadata).to include("x-trailing" => "t")
      expect { client.invoke(:nope) }.to raise_error(ArgumentError, /no unary RPC :nope/)
    end

    it "rejects bad headers with a clear exception before any call" do
      expect { client.processor_heartbeat(headers: {"Bad Key" => "v"}) }.to raise_error(ArgumentError, /Bad Key/)
      expect { client.processor_heartbeat(headers: {"k" => 1}) }.to raise_error(TypeError, /k/)
      expect { client.processor_heartbeat(headers: {"k" => "line\nbreak"}) }.to raise_error(ArgumentError, /-bin/)
      expect { client.processor_heartbeat(headers: "k=v") }.to raise_error(TypeError, /Hash/)
      expect { Flowctl::ControlPlane::Client.new("127.0.0.1:1", tls: false, headers: {":path" => "x"}) }
        .to raise_error(ArgumentError)
      expect(@seen).to be_empty
    end
  end

  describe "deadlines" do
    before do
      answer(:register_processor) do |req, _call|
        sleep Float(req.endpoint)
        cp::RegisterProcessorResponse.new(success: true)
      end
    end

    it "applies the per-call timeout: as the deadline" do
      t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      expect { client.register_processor(endpoint: "1", timeout: 0.2) }.to raise_error(Flowctl::DeadlineExceeded)
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t).to be_between(0.15, 0.8)
      _, _, _, deadline = last_seen
      expect(deadline - Time.now).to be < 0.3
    end

    it "applies the client's timeout, which a per-call timeout (or nil) overrides" do
      c = Flowctl::ControlPlane::Client.new("127.0.0.1:#{@port}", tls: false, timeout: 0.2)
      expect { c.register_processor(endpoint: "0.6") }.to raise_error(Flowctl::DeadlineExceeded)
      expect(c.register_processor(endpoint: "0.4", timeout: 2).success).to be(true)
      expect(c.register_processor(endpoint: "0.4", timeout: nil).success).to be(true)
    ensure
      c&.close
    end

    it "propagates the deadline to the server" do
      client.register_processor(endpoint: "0", timeout: 3)
      _, _, _, deadline = last_seen
      expect(deadline - Time.now).to be_between(1.5, 3.1)
    end
  end

  describe "argument mistakes stay TypeError/ArgumentError" do
    it "checks requests" do
      expect { client.register_processor(42) }.to raise_error(TypeError, /RegisterProcessorRequest/)
      expect { client.register_processor(Flowctl::ControlPlane::RegisterSourceRequest.new) }.to raise_error(TypeError)
      expect { client.register_processor(Flowctl::ControlPlane::RegisterProcessorRequest.new, processor_id: "x") }
        .to raise_error(ArgumentError, /not both/)
      expect { client.register_processor(no_such_field: 1) }.to raise_error(ArgumentError)
      expect { client.register_processor(processor_id: 5) }.to raise_error(TypeError)
      expect { client.register_processor(processor_id: "\xFF") }.to raise_error(ArgumentError)
    end

    it "checks options" do
      expect { client.register_processor(timeout: "5") }.to raise_error(TypeError, /timeout/)
      expect { client.register_processor(timeout: -1) }.to raise_error(ArgumentError, /timeout/)
      expect { Flowctl::ControlPlane::Client.new(:x) }.to raise_error(TypeError, /target/)
      expect { Flowctl::ControlPlane::Client.new("") }.to raise_error(ArgumentError, /target/)
      expect { Flowctl::ControlPlane::Client.new("h:1", tls: "yes") }.to raise_error(TypeError, /tls/)
      expect { Flowctl::ControlPlane::Client.new("h:1", timeout: :long) }.to raise_error(TypeError, /timeout/)
      expect { Flowctl::ControlPlane::Client.new("h:1", channel_args: [1]) }.to raise_error(TypeError, /channel_args/)
      expect { Flowctl::ControlPlane::Client.new("h:1", tls: false, channel_args: {"grpc.x" => 1.5}) }
        .to raise_error(TypeError, /channel_args\["grpc.x"\] must be Integer, String or boolean/)
      expect { Flowctl::ControlPlane::Client.new("h:1", tls: false, channel_args: {"grpc.x" => 2**40}) }
        .to raise_error(RangeError, /outside a C int/)
      expect { Flowctl::ControlPlane::Client.new("h:1", tls: false, channel_args: {1 => 1}) }
        .to raise_error(TypeError, /keys must be String or Symbol/)
      expect { Flowctl::Server.new(channel_args: {"grpc.x\0" => 1}) }.to raise_error(ArgumentError, /NUL/)
      expect(@seen).to be_empty
    end

    it "checks the native primitive's arguments too" do
      ch = client.channel
      expect { Flowctl::Native::Call.unary(ch, "nope", "", nil, {}) }.to raise_error(ArgumentError, /path/)
      expect { Flowctl::Native::Call.unary(ch, "/a/b", 1, nil, {}) }.to raise_error(TypeError)
      expect { Flowctl::Native::Call.unary(:ch, "/a/b", "", nil, {}) }.to raise_error(TypeError)
      expect { Flowctl::Native::Call.unary(ch, "/a/b", "", Float::NAN, {}) }.to raise_error(ArgumentError)
    end
  end

  describe "lifecycle" do
    it "exposes target and channel; #close is idempotent and later calls raise IOError" do
      answer(:consumer_heartbeat) { |_req, _call| cp::ConsumerHeartbeatResponse.new(success: true) }
      c = Flowctl::ControlPlane::Client.new("127.0.0.1:#{@port}", tls: false)
      expect(c.target).to eq("127.0.0.1:#{@port}")
      expect(c.channel).to be_a(Flowctl::Native::Channel)
      expect(c.consumer_heartbeat(consumer_id: "c").success).to be(true)
      expect(c.close).to be_nil
      expect(c.close).to be_nil
      expect(c).to be_closed
      expect { c.consumer_heartbeat }.to raise_error(IOError)
    end

    it "generates exactly the DESIGN.md methods" do
      expect(Flowctl::ControlPlane::Client.public_instance_methods(false)).to contain_exactly(
        :register_processor, :processor_heartbeat, :register_source, :source_heartbeat,
        :register_consumer, :consumer_heartbeat
      )
      expect(Flowctl::Processor::Client.public_instance_methods(false))
        .to contain_exactly(:get_capabilities, :process, :process_stream)
      expect(Flowctl::ControlPlane::Client.superclass).to eq(Flowctl::Client)
    end
  end
end
