# frozen_string_literal: true

require "spec_helper"
require "timeout"

# Issue 17: evil servers and closing clients: the client never hangs, and every status a
# peer sends becomes an RPCError one can rescue, match and print.
RSpec.describe "clients against evil servers, and Client#close" do
  let(:evil) { [] }
  after { evil.each(&:close) }

  def evil_server(trailers)
    HostileServer.new(trailers).tap { |s| evil << s }
  end

  def cp_client(port) = Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false, timeout: time_limit(5))

  describe "odd statuses" do
    it "a grpc-status outside 0..16: an RPCError carrying that code" do
      client = cp_client(evil_server("grpc-status" => "42", "grpc-message" => "odd").port)
      expect { client.register_processor(processor_id: "p") }.to raise_error(Flowctl::RPCError) { |e|
        expect(e.code).to eq(42)
        expect(e.details).to eq("odd")
        expect(e.message).to eq("42:UNKNOWN_CODE: odd")
      }
      client.close
    end

    it "a status message with invalid UTF-8: scrubbed, so the message can be matched and printed" do
      client = cp_client(evil_server("grpc-status" => "13", "grpc-message" => "bad %FF%FE bytes").port)
      expect { client.register_processor(processor_id: "p") }.to raise_error(Flowctl::Internal) { |e|
        expect(e.message).to be_valid_encoding
        expect(e.message =~ /bad/).not_to be_nil
        expect(e.details).to eq("bad \uFFFD\uFFFD bytes")
      }
      client.close
    end

    it "a heartbeat whose beats get grpc-status 42: on_error hears an RPCError with code 42, stop does not raise" do
      client = cp_client(evil_server("grpc-status" => "42").port)
      errors = Queue.new
      hb = client.start_heartbeat(:processor, id: "p", interval: 0.05, on_error: ->(e) { errors << e })
      error = Timeout.timeout(time_limit(10)) { errors.pop }
      expect(error).to be_a(Flowctl::RPCError)
      expect(error.code).to eq(42)
      expect { hb.stop }.not_to raise_error
      client.close
    end

    it "RPCError.new still refuses a code outside 0..16 (a handler must send a real one)" do
      expect { Flowctl::RPCError.new("x", code: 42) }.to raise_error(ArgumentError, /42/)
    end
  end

  describe "process(enum) with an Enumerable that raises" do
    it "IOError, EOFError and an RPCError from the requests: the call is cancelled and the error raised in the caller" do
      echo = Class.new { define_method(:process) { |requests, _call| requests.to_a } }
      server = Flowctl::Server.new(port: 0)
      server.handle(Flowctl::Processor::Service, echo.new)
      server.start
      client = Flowctl::Processor::Client.new("127.0.0.1:#{server.port}", tls: false, timeout: time_limit(30))
      [IOError.new("io"), EOFError.new("eof"), Flowctl::Unavailable.new("gone")].each do |error|
        requests = Enumerator.new do |y|
          y << Flowctl::Processor::DataMessage.new(payload: "a")
          raise error
        end
        started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        expect { Timeout.timeout(time_limit(10)) { client.process(requests) { nil } } }.to raise_error(error.class)
        expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < time_limit(5)
      end
    ensure
      client&.close
      server&.stop(grace: 0.5)
    end
  end

  describe "Client#close with calls in flight" do
    let(:release) { Queue.new }
    let(:server) do
      gate = release
      handler = Class.new do
        define_method(:get_capabilities) { |_req, _call| gate.pop && {} }
        define_method(:process) { |requests, _call| requests.each { nil } && gate.pop && [] }
      end
      Flowctl::Server.new(port: 0).tap do |s|
        s.handle(Flowctl::Processor::Service, handler.new)
        s.start
      end
    end
    after do
      8.times { release << true }
      server.stop(grace: 0.5)
    end

    it "cancels a unary call and a blocked stream reader at once" do
      client = Flowctl::Processor::Client.new("127.0.0.1:#{server.port}", tls: false, timeout: time_limit(30))
      unary = Thread.new { Thread.current.report_on_exception = false; client.get_capabilities }
      stream = client.process_stream
      reader = Thread.new { Thread.current.report_on_exception = false; stream.read }
      sleep 0.3 # both wait on the server now
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      client.close
      expect { unary.value }.to raise_error(Flowctl::Cancelled, /closed/)
      expect { reader.value }.to raise_error(Flowctl::Cancelled, /closed/)
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < time_limit(2)
      expect { client.get_capabilities }.to raise_error(IOError)
    end
  end
end
