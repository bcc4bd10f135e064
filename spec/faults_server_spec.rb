# frozen_string_literal: true

require "spec_helper"
require "json"
require "open3"
require "rbconfig"
require "timeout"

Official.load! # the official grpc gem: a client that can send raw bytes

# The gem's server under bad input and dying clients: each case fails that call only,
# frees what the call held, and the server keeps serving the next call.
RSpec.describe "faults: Flowctl::Server under bad input and dying clients" do
  # An official grpc client whose messages are raw bytes (invalid UTF-8, garbage).
  module FaultsRawClient
    Bytes = Struct.new(:str) do
      def self.encode(obj) = obj.str
      def self.decode(str) = new(str)
    end

    class Service
      include GRPC::GenericService
      self.marshal_class_method = :encode
      self.unmarshal_class_method = :decode
      self.service_name = "obsrvr.flow.controlplane.ControlPlane"
      rpc :RegisterProcessor, Bytes, Bytes
    end
    Stub = Service.rpc_stub_class
  end

  class FaultsHandler
    attr_reader :process_ended

    def initialize
      @process_ended = Queue.new
    end

    def register_processor(req, _call)
      Flowctl::ControlPlane::RegisterProcessorResponse.new(processor_id: req.processor_id, success: true)
    end

    def processor_heartbeat(req, _call)
      Flowctl::ControlPlane::ProcessorHeartbeatResponse.new(success: true, message: req.status.bytesize.to_s)
    end

    def process(requests, call)
      Enumerator.new do |y|
        requests.each { |r| y << r }
        @process_ended << [:end, call.cancelled?]
      rescue Exception => e # rubocop:disable Lint/RescueException
        @process_ended << [e.class.name, call.cancelled?]
        raise
      end
    end
  end

  let(:handler) { FaultsHandler.new }
  let(:server) do
    Flowctl::Server.new(host: "127.0.0.1", port: 0, tls: false, pool_size: 4).tap do |s|
      s.handle(Flowctl::ControlPlane::Service, handler)
      s.handle(Flowctl::Processor::Service, handler)
    end
  end
  let(:port) { server.start }
  let(:client) { Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false, timeout: 5) }

  after do
    client.close
    Timeout.timeout(10) { server.stop(grace: 1) }
  end

  def still_serving
    expect(client.register_processor(processor_id: "next").processor_id).to eq("next")
  end

  it "an oversized request (5 MB > 4 MB): RESOURCE_EXHAUSTED for that call, the server keeps serving" do
    expect { client.processor_heartbeat(processor_id: "p", status: "x" * (5 * 1024 * 1024)) }
      .to raise_error(Flowctl::ResourceExhausted)
    still_serving
    expect(client.processor_heartbeat(processor_id: "p", status: "x" * 1000).message).to eq("1000")
  end

  it "invalid UTF-8 in a string field from a peer: an error status on that call only, naming the field" do
    stub = FaultsRawClient::Stub.new("127.0.0.1:#{port}", :this_channel_is_insecure)
    bad = FaultsRawClient::Bytes.new("\x0A\x03p\xFF1".b) # processor_id
    expect { stub.register_processor(bad, deadline: Time.now + 5) }
      .to raise_error(GRPC::BadStatus) { |e|
        expect([GRPC::Core::StatusCodes::INVALID_ARGUMENT, GRPC::Core::StatusCodes::INTERNAL]).to include(e.code)
        expect(e.details).to match(/processor_id|UTF-8/)
      }
    garbage = FaultsRawClient::Bytes.new("\xFF\xFF\xFF".b)
    expect { stub.register_processor(garbage, deadline: Time.now + 5) }.to raise_error(GRPC::BadStatus)
    good = FaultsRawClient::Bytes.new(Flowctl::ControlPlane::RegisterProcessorRequest.new(processor_id: "ok").to_proto)
    reply = Flowctl::ControlPlane::RegisterProcessorResponse.decode(stub.register_processor(good, deadline: Time.now + 5).str)
    expect(reply.processor_id).to eq("ok")
    still_serving
  end

  it "wrong content types and HTTP/1.1: answered without a crash, the server keeps serving" do
    skip "curl is not installed" unless system("curl --version > /dev/null 2>&1")
    url = "http://127.0.0.1:#{port}/obsrvr.flow.controlplane.ControlPlane/RegisterProcessor"
    [
      [["--http2-prior-knowledge", "-H", "content-type: application/json"], "{}"],
      [["--http2-prior-knowledge", "-H", "content-type: text/html"], "\x00\x00\x00\x00\x00"],
      [["--http2-prior-knowledge", "-H", "content-type: application/grpc"], "not a grpc frame"],
      [["--http2-prior-knowledge", "-H", "content-type: application/grpc", "-H", "te: trailers"], "\x00\x00\x00\x10\x00\x0a\x01"],
      [["--http1.1", "-H", "content-type: application/grpc"], "x"]
    ].each do |args, body|
      out, _status = Open3.capture2e("curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", *args,
                                     "--data-binary", "@-", url, stdin_data: body.b)
      expect(out).to match(/\A\d{3}|\(\d+\)|curl: /), "curl #{args.inspect}: #{out}"
      still_serving
    end
  end

  it "a client killed mid-stream: the handler's request stream ends, the call is freed, the server goes on" do
    script = <<~'RUBY'
      $LOAD_PATH.unshift ARGV[0]
      require "flowctl"
      $stdout.sync = true
      pr = Flowctl::Processor::Client.new("127.0.0.1:#{ARGV[1]}", tls: false)
      call = pr.process_stream
      msg = Flowctl::Processor::DataMessage.new(payload: "x")
      3.times { call.write(msg); call.read }
      puts "STREAMING"
      sleep
    RUBY
    port # started
    io = IO.popen([RbConfig.ruby, "-e", script, File.expand_path("../lib", __dir__), port.to_s])
    Timeout.timeout(15) { expect(io.gets).to eq("STREAMING\n") }
    Process.kill(:KILL, io.pid)
    Process.wait(io.pid)
    io.close
    ended = OfficialServer.pop(handler.process_ended, 10)
    expect(ended).not_to be_nil, "the handler of the killed client's stream never ended"
    deadline = Time.now + 5
    sleep 0.05 until server.stats[:idle] == server.pool_size || Time.now > deadline
    expect(server.stats[:idle]).to eq(server.pool_size)
    still_serving
  end
end
