# frozen_string_literal: true

require "spec_helper"

# Flowctl::Server driven by the official grpc gem's client (interop): every RPC shape,
# errors, concurrency limits, stop, and clients that go away.
RSpec.describe "Flowctl::Server with the official grpc client" do
  before(:all) { Official.load! }

  let(:cp) { Obsrvr::Flow::Controlplane }
  let(:pr) { Obsrvr::Flow::Processor }
  let(:servers) { [] }

  after { servers.each { |s| s.stop(grace: 0.5) } }

  def serve(handlers, opts = {})
    server = Flowctl::Server.new(port: 0, tls: false, **opts)
    handlers.each { |service, handler| server.handle(service, handler) }
    servers << server
    server.start
    server
  end

  def cp_stub(server, **opts)
    cp::ControlPlane::Stub.new("127.0.0.1:#{server.port}", :this_channel_is_insecure, **opts)
  end

  def pr_stub(server)
    pr::ProcessorService::Stub.new("127.0.0.1:#{server.port}", :this_channel_is_insecure)
  end

  def data(payload, meta = {})
    pr::DataMessage.new(payload: payload, metadata: meta)
  end

  # A control plane handler whose behaviour each example sets with a block.
  class ScriptedCP
    def initialize(&blk) = @blk = blk
    def register_processor(req, call) = @blk.call(req, call)
  end

  class Upcaser
    def process(requests, _call)
      requests.each { |m| yield Flowctl::Processor::DataMessage.new(payload: m.payload.upcase, metadata: m.metadata) }
    end

    def get_capabilities(_req, _call)
      Flowctl::Processor::CapabilitiesResponse.new(processor_id: "up", name: "upcase", input_event_types: ["raw"],
                                                   max_concurrent: 4)
    end
  end

  describe "unary" do
    it "decodes the request, runs the handler and encodes the response, with headers, peer and deadline" do
      seen = {}
      server = serve(Flowctl::ControlPlane::Service => ScriptedCP.new { |req, call|
        seen.merge!(req: req, headers: call.headers, peer: call.peer, deadline: call.deadline, path: call.method_path)
        Flowctl::ControlPlane::RegisterProcessorResponse.new(processor_id: req.processor_id, success: true, message: "hi")
      })
      t0 = Time.now
      reply = cp_stub(server).register_processor(cp::RegisterProcessorRequest.new(processor_id: "p1", endpoint: "e:1",
                                                                                  metadata: { "zone" => "a" }),
                                                 metadata: { "x-trace" => "abc" }, deadline: t0 + 5)
      expect(reply).to eq(cp::RegisterProcessorResponse.new(processor_id: "p1", success: true, message: "hi"))
      expect(seen[:req]).to be_a(Flowctl::ControlPlane::RegisterProcessorRequest)
      expect(seen[:req].metadata).to eq("zone" => "a")
      expect(seen[:req].endpoint).to eq("e:1")
      expect(seen[:headers]["x-trace"]).to eq("abc")
      expect(seen[:peer]).to match(/\Aipv4:127\.0\.0\.1:\d+\z/)
      expect(seen[:deadline]).to be_within(0.5).of(t0 + 5)
      expect(seen[:path]).to eq("/obsrvr.flow.controlplane.ControlPlane/RegisterProcessor")
    end

    it "accepts a Hash of the response's fields and a one-argument handler method" do
      handler = Object.new
      def handler.get_capabilities(_req) = { name: "hash", "version" => "2", output_event_types: %w[a b] }
      server = serve(Flowctl::Processor::Service => handler)
      reply = pr_stub(server).get_capabilities(pr::CapabilitiesRequest.new)
      expect([reply.name, reply.version, reply.output_event_types.to_a]).to eq(["hash", "2", %w[a b]])
    end

    it "gives no deadline when the client sets none" do
      got = :unset
      server = serve(Flowctl::ControlPlane::Service => ScriptedCP.new { |_r, call| got = call.deadline; {} })
      cp_stub(server).register_processor(cp::RegisterProcessorRequest.new)
      expect(got).to be_nil
    end

    it "turns a raised Flowctl::RPCError into that status with details and trailing metadata" do
      server = serve(Flowctl::ControlPlane::Service => ScriptedCP.new { |_r, _c|
        raise Flowctl::NotFound.new("no such processor", metadata: { "x-why" => "gone" })
      })
      expect { cp_stub(server).register_processor(cp::RegisterProcessorRequest.new) }
        .to raise_error(GRPC::NotFound) { |e|
          expect(e.details).to eq("no such processor")
          expect(e.metadata["x-why"]).to eq("gone")
        }
    end

    it "turns Flowctl::RPCError.new(code:) into that code" do
      server = serve(Flowctl::ControlPlane::Service => ScriptedCP.new { raise Flowctl::RPCError.new("slow down", code: 8) })
      expect { cp_stub(server).register_processor(cp::RegisterProcessorRequest.new) }
        .to raise_error(GRPC::ResourceExhausted, /slow down/)
    end

    it "turns any other exception into UNKNOWN for that call only, and keeps serving" do
      calls = 0
      server = serve(Flowctl::ControlPlane::Service => ScriptedCP.new { |req, _c|
        calls += 1
        raise ArgumentError, "boom" if req.processor_id == "bad"

        { processor_id: req.processor_id, success: true }
      })
      stub = cp_stub(server)
      expect { stub.register_processor(cp::RegisterProcessorRequest.new(processor_id: "bad")) }
        .to raise_error(GRPC::Unknown) { |e| expect(e.details).to eq("ArgumentError: boom") }
      expect(stub.register_processor(cp::RegisterProcessorRequest.new(processor_id: "ok")).success).to be(true)
      expect(calls).to eq(2)
    end

    it "answers INTERNAL when the handler returns something that is not the response" do
      server = serve(Flowctl::ControlPlane::Service => ScriptedCP.new { "not a response" })
      expect { cp_stub(server).register_processor(cp::RegisterProcessorRequest.new) }
        .to raise_error(GRPC::Internal, /RegisterProcessor must reply with a Flowctl::ControlPlane::RegisterProcessorResponse/)
    end

    it "answers INTERNAL naming the field when a Hash reply has a wrong field" do
      server = serve(Flowctl::ControlPlane::Service => ScriptedCP.new { { no_such_field: 1 } })
      expect { cp_stub(server).register_processor(cp::RegisterProcessorRequest.new) }
        .to raise_error(GRPC::Internal, /no_such_field/)
    end

    it "answers INTERNAL when the request bytes are not a valid message" do
      server = serve(Flowctl::ControlPlane::Service => ScriptedCP.new { {} })
      stub = GRPC::ClientStub.new("127.0.0.1:#{server.port}", :this_channel_is_insecure)
      garbage = ->(_) { "\xff\xff\xff\xff".b }
      expect { stub.request_response("/obsrvr.flow.controlplane.ControlPlane/RegisterProcessor", nil, garbage, ->(s) { s }) }
        .to raise_error(GRPC::Internal, /cannot decode obsrvr.flow.controlplane.RegisterProcessorRequest/)
    end

    it "sends the trailing metadata a handler sets" do
      server = serve(Flowctl::ControlPlane::Service => ScriptedCP.new { |_r, call|
        call.trailing_metadata = { "x-served-by" => "flowctl" }
        {}
      })
      op = cp_stub(server).register_processor(cp::RegisterProcessorRequest.new, return_op: true)
      op.execute
      expect(op.trailing_metadata["x-served-by"]).to eq("flowctl")
    end

    it "answers UNIMPLEMENTED for an RPC the handler lacks and for a service not handled" do
      server = serve(Flowctl::ControlPlane::Service => ScriptedCP.new { {} })
      expect { cp_stub(server).register_source(cp::RegisterSourceRequest.new) }
        .to raise_error(GRPC::Unimplemented, %r{/obsrvr.flow.controlplane.ControlPlane/RegisterSource})
      expect { pr_stub(server).get_capabilities(pr::CapabilitiesRequest.new) }.to raise_error(GRPC::Unimplemented)
    end
  end

  describe "bidi" do
    it "streams replies a handler yields while it reads requests (ping-pong, not buffered)" do
      server = serve(Flowctl::Processor::Service => Upcaser.new)
      replies = Queue.new
      requests = Enumerator.new do |y|
        3.times do |i|
          y << data("m#{i}", "i" => i.to_s)
          # the next request goes out only after the reply to this one came back
          expect(replies.pop.payload).to eq("M#{i}")
        end
      end
      out = []
      pr_stub(server).process(requests).each { |r| out << r; replies << r }
      expect(out.map(&:payload)).to eq(%w[M0 M1 M2])
      expect(out.map { |r| r.metadata["i"] }).to eq(%w[0 1 2])
    end

    it "sends the Enumerable a handler returns, or what it writes with call.write / call << (then not what it returns)" do
      returns = Object.new
      def returns.process(requests, _call) = requests.map { |m| { payload: m.payload * 2 } }
      writes = Object.new
      def writes.process(requests, call)
        call.write(Flowctl::Processor::DataMessage.new(payload: "hello"))
        call << { payload: "there" }
        requests.each { |m| call << { payload: m.payload * 3 } } # returns the requests: not sent again
      end
      server = serve(Flowctl::Processor::Service => returns)
      expect(pr_stub(server).process([data("a"), data("b")]).map(&:payload)).to eq(%w[aa bb])
      server = serve(Flowctl::Processor::Service => writes)
      expect(pr_stub(server).process([data("a"), data("b")]).map(&:payload)).to eq(%w[hello there aaa bbb])
    end

    it "serves a stream with no requests and a handler that returns nothing" do
      handler = Object.new
      def handler.process(requests, _call) = requests.each { nil } && nil
      server = serve(Flowctl::Processor::Service => handler)
      expect(pr_stub(server).process([]).to_a).to eq([])
    end

    it "ends the stream with the status a handler raises mid-stream" do
      handler = Object.new
      def handler.process(requests, _call)
        requests.each do |m|
          raise Flowctl::InvalidArgument, "payload #{m.payload} rejected" if m.payload == "bad"

          yield m
        end
      end
      server = serve(Flowctl::Processor::Service => handler)
      got = []
      expect { pr_stub(server).process([data("ok"), data("bad"), data("never")]).each { |r| got << r.payload } }
        .to raise_error(GRPC::InvalidArgument, /payload bad rejected/)
      expect(got).to eq(["ok"])
    end

    it "lets the handler see a client that cancels mid-stream, and frees its worker" do
      seen = Queue.new
      handler = Object.new
      handler.define_singleton_method(:process) do |requests, _call, &out|
        requests.each { |m| out.call(m) }
        seen << :ended
      rescue Flowctl::Cancelled => e
        seen << e
        raise
      end
      server = serve({ Flowctl::Processor::Service => handler }, pool_size: 2)
      gate = Queue.new
      requests = Enumerator.new { |y| y << data("one"); gate.pop; y << data("two") }
      op = pr_stub(server).process(requests, return_op: true)
      replies = op.execute
      expect(replies.next.payload).to eq("one")
      op.cancel
      expect(seen.pop).to be_a(Flowctl::Cancelled)
      gate << :go
      deadline = Time.now + 5
      sleep 0.01 until server.stats[:idle] == 2 || Time.now > deadline
      expect(server.stats[:idle]).to eq(2)
      expect(pr_stub(server).process([data("again")]).map(&:payload)).to eq(["again"])
    end
  end

  describe "leaks" do
    it "releases every call after handler errors and clients that cancel mid-stream" do
      handler = Object.new
      def handler.get_capabilities(req, _call) = raise("handler bug")
      handler.define_singleton_method(:process) { |requests, _call, &out| requests.each { |m| out.call(m) } }
      server = serve({ Flowctl::Processor::Service => handler }, pool_size: 4)
      stub = pr_stub(server)
      40.times do
        expect { stub.get_capabilities(pr::CapabilitiesRequest.new) }.to raise_error(GRPC::Unknown, /handler bug/)
        gate = Queue.new
        op = stub.process(Enumerator.new { |y| y << data("x"); gate.pop }, return_op: true)
        replies = op.execute
        replies.next
        op.cancel
        gate << :go
      end
      deadline = Time.now + 5
      sleep 0.01 until server.stats[:idle] == 4 || Time.now > deadline
      expect(server.stats).to include(idle: 4, queued: 0, rejected: 0)
      live = ObjectSpace.each_object(Flowctl::Native::ServerCall).reject(&:finished?)
      expect(live).to be_empty
      t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      server.stop(grace: 5) # returns at once only when no call is left holding the server
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0).to be < time_limit(1)
    end
  end

  describe "concurrency" do
    it "serves several calls at once" do
      arrived = Queue.new
      release = Queue.new
      server = serve({ Flowctl::ControlPlane::Service => ScriptedCP.new { |req, _c|
        arrived << req.processor_id
        release.pop
        { processor_id: req.processor_id, success: true }
      } }, pool_size: 4)
      stub = cp_stub(server)
      threads = 4.times.map { |i| Thread.new { stub.register_processor(cp::RegisterProcessorRequest.new(processor_id: "p#{i}")) } }
      ids = 4.times.map { arrived.pop }
      expect(ids.sort).to eq(%w[p0 p1 p2 p3]) # all four handlers run at the same time
      4.times { release << :go }
      expect(threads.map { |t| t.value.processor_id }.sort).to eq(%w[p0 p1 p2 p3])
    end

    it "answers RESOURCE_EXHAUSTED at once when every worker is busy, and serves again after" do
      arrived = Queue.new
      release = Queue.new
      server = serve({ Flowctl::ControlPlane::Service => ScriptedCP.new { |_r, _c|
        arrived << 1
        release.pop
        { success: true }
      } }, pool_size: 1)
      stub = cp_stub(server)
      first = Thread.new { stub.register_processor(cp::RegisterProcessorRequest.new) }
      arrived.pop
      t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      expect { stub.register_processor(cp::RegisterProcessorRequest.new) }
        .to raise_error(GRPC::ResourceExhausted, /server busy/)
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0).to be < (ENV["GC_STRESS"] ? 10 : 1.0)
      release << :go
      expect(first.value.success).to be(true)
      expect(server.stats[:rejected]).to eq(1)
      release << :go
      expect(stub.register_processor(cp::RegisterProcessorRequest.new).success).to be(true)
    end
  end

  describe "#stop" do
    it "lets calls in flight finish within the grace period" do
      arrived = Queue.new
      server = serve(Flowctl::ControlPlane::Service => ScriptedCP.new { |_r, _c|
        arrived << 1
        sleep 0.3
        { success: true, message: "finished" }
      })
      call = Thread.new { cp_stub(server).register_processor(cp::RegisterProcessorRequest.new) }
      arrived.pop
      server.stop(grace: 5)
      expect(call.value.message).to eq("finished")
      expect(server.running?).to be(false)
    end

    it "cancels calls still running after the grace period, even handlers that ignore it" do
      arrived = Queue.new
      ended = Queue.new
      handler = Object.new
      handler.define_singleton_method(:process) do |requests, _call, &out|
        arrived << 1
        requests.each { |m| out.call(m) } # blocked reading: the cancel ends it
      ensure
        ended << :stream
      end
      handler.define_singleton_method(:get_capabilities) do |_r, _c|
        arrived << 1
        sleep # ignores the cancellation: killed after it
      ensure
        ended << :unary
      end
      server = serve(Flowctl::Processor::Service => handler)
      stub = pr_stub(server)
      gate = Queue.new
      stream = Thread.new { stub.process(Enumerator.new { |y| y << data("x"); gate.pop }).to_a rescue $! }
      unary = Thread.new { stub.get_capabilities(pr::CapabilitiesRequest.new) rescue $! }
      2.times { arrived.pop }
      t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      server.stop(grace: 0.2)
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0).to be < time_limit(3)
      expect([ended.pop, ended.pop].sort).to eq(%i[stream unary])
      expect(unary.value).to be_a(GRPC::BadStatus)
      gate << :go
      expect(stream.value).to be_a(GRPC::BadStatus)
    end

    it "is idempotent, and refuses new calls afterwards" do
      server = serve(Flowctl::ControlPlane::Service => ScriptedCP.new { {} })
      port = server.port
      server.stop
      server.stop
      stub = cp::ControlPlane::Stub.new("127.0.0.1:#{port}", :this_channel_is_insecure, timeout: 1)
      expect { stub.register_processor(cp::RegisterProcessorRequest.new) }
        .to raise_error(GRPC::BadStatus) { |e| expect([GRPC::Unavailable, GRPC::DeadlineExceeded]).to include(e.class) }
    end
  end

  describe "configuration errors" do
    it "refuses implicit plaintext on a non-loopback host" do
      expect { Flowctl::Server.new(host: "0.0.0.0") }.to raise_error(ArgumentError, /tls: false/)
      expect(Flowctl::Server.new(host: "0.0.0.0", tls: false)).to be_a(Flowctl::Server)
      expect { Flowctl::Server.new(tls: "yes") }.to raise_error(TypeError, /Flowctl::TLS/)
    end

    it "checks services and handlers" do
      server = Flowctl::Server.new(port: 0)
      expect { server.handle(Object, Upcaser.new) }.to raise_error(TypeError, /Flowctl::Service/)
      expect { server.handle(Flowctl::ControlPlane::Service, Upcaser.new) }
        .to raise_error(ArgumentError, /no method for any RPC of obsrvr.flow.controlplane.ControlPlane/)
      expect { server.start }.to raise_error(ArgumentError, /no handlers/)
    end

    it "raises when the port is taken, and on a bad pool_size or auth_token" do
      first = serve(Flowctl::Processor::Service => Upcaser.new)
      second = Flowctl::Server.new(port: first.port, tls: false).handle(Flowctl::Processor::Service, Upcaser.new)
      expect { second.start }.to raise_error(ArgumentError, /cannot listen on 127.0.0.1:#{first.port}/)
      expect { Flowctl::Server.new(pool_size: 0) }.to raise_error(ArgumentError, /pool_size/)
      expect { Flowctl::Server.new(auth_token: "") }.to raise_error(ArgumentError, /auth_token/)
      expect { Flowctl::Server.new(auth_token: 1) }.to raise_error(TypeError, /auth_token/)
    end

    it "refuses to start twice and to add handlers once started" do
      server = serve(Flowctl::Processor::Service => Upcaser.new)
      expect { server.start }.to raise_error(RuntimeError, /already started/)
      expect { server.handle(Flowctl::Processor::Service, Upcaser.new) }.to raise_error(RuntimeError, /before #start/)
    end
  end
end
