# frozen_string_literal: true

require "spec_helper"
require "socket"
require "timeout"

Official.load! # the official grpc gem: the peer of these specs

# Bad input over the wire and peers that misbehave, seen from the gem's client: every
# case ends with a clear Ruby exception on that call only, on time, and the client (and
# the server, when it is ours or the official one) keeps working afterwards.
RSpec.describe "faults on the wire (client side)" do
  # The official grpc server with services whose messages are raw bytes, so a handler
  # can answer what no generated class would write (invalid UTF-8, garbage, 5 MB).
  module FaultsRawWire
    # the grpc gem marshals a reply with reply.class.encode(reply)
    Bytes = Struct.new(:str) do
      def self.encode(obj) = obj.str
      def self.decode(str) = new(str)
    end

    class ControlPlane
      include GRPC::GenericService
      self.marshal_class_method = :encode
      self.unmarshal_class_method = :decode
      self.service_name = "obsrvr.flow.controlplane.ControlPlane"
      rpc :RegisterProcessor, Bytes, Bytes
      rpc :ProcessorHeartbeat, Bytes, Bytes
    end

    class Processor
      include GRPC::GenericService
      self.marshal_class_method = :encode
      self.unmarshal_class_method = :decode
      self.service_name = "obsrvr.flow.processor.ProcessorService"
      rpc :Process, stream(Bytes), stream(Bytes)
    end
  end

  FAULTS_OK_REPLY = Flowctl::ControlPlane::RegisterProcessorResponse.new(processor_id: "ok", success: true).to_proto

  def self.raw_server(cp: nil, pr: nil)
    Official.load!
    server = GRPC::RpcServer.new(pool_size: 8, poll_period: 0.1)
    port = server.add_http2_port("127.0.0.1:0", :this_port_is_insecure)
    server.handle(cp) if cp
    server.handle(pr) if pr
    thread = Thread.new { server.run }
    server.wait_till_running(10) or raise "raw server did not start"
    [server, port, thread]
  end

  def stop_raw(server, thread)
    stopper = Thread.new { server.stop }
    stopper.join(5) or stopper.kill
    thread.join(5) or thread.kill
  end

  def elapsed
    t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    yield
  ensure
    @elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0
  end

  describe "replies a peer should not send" do
    before(:all) do
      Official.load!
      replies = @replies = Queue.new
      cp = Class.new(FaultsRawWire::ControlPlane) do
        define_method(:register_processor) { |_req, _call| FaultsRawWire::Bytes.new(replies.pop(true)) rescue FaultsRawWire::Bytes.new(FAULTS_OK_REPLY) }
        define_method(:processor_heartbeat) { |req, _call| req } # echoes what it was sent
      end
      pr = Class.new(FaultsRawWire::Processor) do
        define_method(:process) do |reqs, _call|
          bad = Flowctl::Processor::DataMessage.new(payload: "bad").to_proto
          reqs.lazy.map { |r| r.str == bad ? FaultsRawWire::Bytes.new("\x12\x06\x0A\x02\xFF\xFE\x12\x00".b) : r }
        end
      end
      @server, @port, @thread = self.class.raw_server(cp: cp.new, pr: pr.new)
    end

    after(:all) { stop_raw(@server, @thread) }

    let(:client) { Flowctl::ControlPlane::Client.new("127.0.0.1:#{@port}", tls: false, timeout: 5) }

    after { client.close }

    it "invalid UTF-8 in a string field: DecodeError naming the field, on that call only" do
      @replies << "\x0A\x03p\xFF1".b
      expect { client.register_processor(processor_id: "p") }
        .to raise_error(Flowctl::DecodeError, /invalid UTF-8 in string field 'processor_id'/)
      expect(client.register_processor(processor_id: "p").processor_id).to eq("ok")
    end

    it "invalid UTF-8 in a map key of a reply: DecodeError, the client goes on" do
      entry = "\x0A\x02\xC3\x28\x12\x01v".b # key "\xC3\x28" is not UTF-8
      @replies << ("\x1A".b + entry.bytesize.chr + entry)
      expect { client.register_processor(processor_id: "p") }
        .to raise_error(Flowctl::DecodeError, /invalid UTF-8/)
      expect(client.register_processor(processor_id: "p").success).to be(true)
    end

    it "garbage instead of a message: DecodeError, the client goes on" do
      @replies << "\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF\xFF".b
      expect { client.register_processor(processor_id: "p") }.to raise_error(Flowctl::DecodeError, /cannot decode/)
      @replies << "\x0A\x10short".b
      expect { client.register_processor(processor_id: "p") }.to raise_error(Flowctl::DecodeError, /truncated/)
      expect(client.register_processor(processor_id: "p").success).to be(true)
    end

    it "an oversized reply (5 MB > the 4 MB default): ResourceExhausted, the next call works" do
      @replies << Flowctl::ControlPlane::RegisterProcessorResponse.new(message: "x" * (5 * 1024 * 1024)).to_proto
      expect { client.register_processor(processor_id: "p") }.to raise_error(Flowctl::ResourceExhausted)
      expect(client.register_processor(processor_id: "p").success).to be(true)
    end

    it "an oversized request (5 MB to a server that takes 4 MB): ResourceExhausted, the server keeps serving" do
      big = {"blob" => "x" * (5 * 1024 * 1024)}
      expect { client.processor_heartbeat(processor_id: "p", metrics: {}, status: big["blob"]) }
        .to raise_error(Flowctl::ResourceExhausted)
      reply = client.processor_heartbeat(processor_id: "p", status: "HEALTHY")
      expect(reply).to be_a(Flowctl::ControlPlane::ProcessorHeartbeatResponse)
      expect(client.register_processor(processor_id: "p").success).to be(true)
    end

    it "invalid UTF-8 in the middle of a stream: the read raises DecodeError, nothing hangs" do
      pr = Flowctl::Processor::Client.new("127.0.0.1:#{@port}", tls: false)
      call = pr.process_stream(timeout: 10)
      good = Flowctl::Processor::DataMessage.new(payload: "a")
      call.write(good)
      expect(call.read).to eq(good)
      call.write(Flowctl::Processor::DataMessage.new(payload: "bad")) # payload "bad": the server answers garbage
      Timeout.timeout(5) { expect { call.read }.to raise_error(Flowctl::DecodeError, /invalid UTF-8/) }
      # a new stream on the same client works
      again = pr.process_stream(timeout: 10)
      again.write(good)
      expect(again.read).to eq(good)
      again.close_write
      expect(again.read).to be_nil
    ensure
      pr&.close
    end
  end

  describe "peers that never answer: deadlines fire on time" do
    it "a TCP listener that accepts and never speaks: DeadlineExceeded after the timeout" do
      listener = TCPServer.new("127.0.0.1", 0)
      accepted = []
      acceptor = Thread.new { loop { accepted << listener.accept } }
      client = Flowctl::ControlPlane::Client.new("127.0.0.1:#{listener.addr[1]}", tls: false)
      [0.2, 0.5].each do |t|
        expect { elapsed { client.register_processor(processor_id: "p", timeout: t) } }
          .to raise_error(Flowctl::DeadlineExceeded)
        expect(@elapsed).to be_between(t * 0.9, t + 1.5)
      end
      expect(accepted).not_to be_empty
    ensure
      client&.close
      acceptor&.kill
      accepted&.each(&:close)
      listener&.close
    end

    it "a server whose handler never returns: unary and stream deadlines fire on time" do
      Official.load!
      release = Queue.new
      cp = Class.new(FaultsRawWire::ControlPlane) do
        define_method(:register_processor) { |_req, _call| OfficialServer.pop(release, 10); FaultsRawWire::Bytes.new(FAULTS_OK_REPLY) }
      end
      pr = Class.new(FaultsRawWire::Processor) do
        define_method(:process) { |_reqs, _call| OfficialServer.pop(release, 10); [] }
      end
      server, port, thread = self.class.raw_server(cp: cp.new, pr: pr.new)
      client = Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false)
      expect { elapsed { client.register_processor(processor_id: "p", timeout: 0.4) } }
        .to raise_error(Flowctl::DeadlineExceeded)
      expect(@elapsed).to be_between(0.35, 1.9)

      pr_client = Flowctl::Processor::Client.new("127.0.0.1:#{port}", tls: false)
      call = pr_client.process_stream(timeout: 0.4)
      call.write(Flowctl::Processor::DataMessage.new(payload: "x"))
      expect { elapsed { call.read } }.to raise_error(Flowctl::DeadlineExceeded)
      expect(@elapsed).to be_between(0.2, 1.9)
    ensure
      4.times { release << :go }
      client&.close
      pr_client&.close
      stop_raw(server, thread) if server
    end

    it "an HTTP/1.1 server (wrong protocol and content type): a clear RPCError quickly, no hang" do
      listener = TCPServer.new("127.0.0.1", 0)
      responder = Thread.new do
        loop do
          sock = listener.accept
          sock.readpartial(4096) rescue nil
          sock.write("HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\nContent-Length: 5\r\n\r\n<html")
          sock.close
        end
      end
      client = Flowctl::ControlPlane::Client.new("127.0.0.1:#{listener.addr[1]}", tls: false)
      expect { elapsed { client.register_processor(processor_id: "p", timeout: 5) } }
        .to raise_error(Flowctl::RPCError) { |e| expect(e).not_to be_a(Flowctl::DeadlineExceeded) }
      expect(@elapsed).to be < time_limit(4)
    ensure
      client&.close
      responder&.kill
      listener&.close
    end
  end

  describe "a server that ends streams mid-way" do
    it "a handler that fails after two replies: two replies, then the status as RPCError" do
      Official.load!
      pr = Class.new(FaultsRawWire::Processor) do
        define_method(:process) do |reqs, _call|
          Enumerator.new do |y|
            reqs.each_with_index do |r, i|
              raise GRPC::Internal, "handler broke" if i == 2

              y << r
            end
          end
        end
      end
      server, port, thread = self.class.raw_server(pr: pr.new)
      client = Flowctl::Processor::Client.new("127.0.0.1:#{port}", tls: false)
      call = client.process_stream(timeout: 10)
      msg = Flowctl::Processor::DataMessage.new(payload: "p")
      2.times do
        call.write(msg)
        expect(call.read).to eq(msg)
      end
      call.write(msg) rescue nil # the server may already have ended the call
      expect { Timeout.timeout(5) { call.read } }.to raise_error(Flowctl::Internal, /handler broke/)
      expect(call.status).to eq(13)
    ensure
      client&.close
      stop_raw(server, thread) if server
    end

    it "a server process killed mid-stream: the read raises Unavailable, nothing hangs, the client goes on" do
      peer = OfficialServer.new(subprocess: true)
      port = peer.start(handler_for_processor: "OfficialServer::EchoProcessor")
      client = Flowctl::Processor::Client.new("127.0.0.1:#{port}", tls: false)
      call = client.process_stream(timeout: 20)
      msg = Flowctl::Processor::DataMessage.new(payload: "p")
      call.write(msg)
      expect(call.read).to eq(msg)
      Process.kill(:KILL, peer.instance_variable_get(:@pid))
      expect do
        Timeout.timeout(10) do
          5.times { call.write(msg) rescue nil }
          call.read
        end
      end.to raise_error(Flowctl::Unavailable)
      expect { client.get_capabilities(timeout: 2) }.to raise_error(Flowctl::Unavailable)
    ensure
      client&.close
      peer&.stop
    end
  end
end
