# frozen_string_literal: true

require "spec_helper"
require "timeout"

# Issue 17: hostile peers (hand-built HTTP/2 from Ruby sockets, spec/support/hostile_peer.rb)
# cost their own calls and connections, never the server.
RSpec.describe "hostile peers against Flowctl::Server" do
  REGISTER = "/obsrvr.flow.controlplane.ControlPlane/RegisterProcessor"
  # Floods measure service under load; under GC.stress every allocation of the server's
  # workers is a full GC, and no flood can be served (one example ran 25 minutes). Under
  # valgrind (rake memcheck) the acceptor is slowed so far that the watchdog takes it for a
  # stalled gRPC and replaces the listener, and the good client sees a refused connection:
  # the watchdog doing its job at 20-50x slower, not a memory error. The C paths the floods
  # take (lingering, offenses, the watchdog) are run by the other examples in both modes.
  FLOOD = if ENV["GC_STRESS"] == "1" then { skip: "a flood cannot be served under GC.stress" }
          elsif ENV["FLOWCTL_MEMCHECK"] then { skip: "a flood cannot be served in time under valgrind" }
          else {}
          end
  PROCESS = "/obsrvr.flow.processor.ProcessorService/Process"

  let(:servers) { [] }
  after { servers.each { |s| s.stop(grace: 0.5) } }

  def serve(**opts)
    server = Flowctl::Server.new(port: 0, **opts)
    server.handle(Flowctl::ControlPlane::Service, Flowctl::ControlPlane::Registry.new)
    yield server if block_given?
    servers << server
    server.start
    server
  end

  def client(server, token = nil, timeout: 2)
    headers = token ? { "authorization" => "Bearer #{token}" } : {}
    Flowctl::ControlPlane::Client.new("127.0.0.1:#{server.port}", tls: false, timeout: time_limit(timeout),
                                                                   headers: headers)
  end

  def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  it "a peer without the token that sends calls and never reads: the token's calls go on, its connection is shut",
     **FLOOD do
    server = serve(auth_token: "s3cret")
    good = client(server, "s3cret", timeout: 5) # measured: at most 0.6 s (one call, as the flood starts)
    flood = HostilePeer.spawn(<<~RUBY)
      peer = HostilePeer.new(#{server.port}, rcvbuf: 4096)
      limit = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 20
      sent = 0
      sent += 500 while Process.clock_gettime(Process::CLOCK_MONOTONIC) < limit && peer.calls(500, "#{REGISTER}")
      puts sent, peer.closed_by_server?
    RUBY
    results = Array.new(15) do |i|
      sleep 0.1
      good.register_processor(processor_id: "p#{i}").success
    rescue Flowctl::RPCError => e
      e
    end
    expect(results).to all(be(true))
    sent, closed = flood.value.split
    expect(Integer(sent)).to be > 0
    expect(closed).to eq("true") # the flood ended because the server shut its connection
    # shut as abusive (refused calls) or stuck (never reads); on a slow machine the watchdog may
    # get there first, as a stall (CI: neither of the first two counted) or a memory burst
    closes = server.stats.slice(:stuck_closed, :abusive_closed, :stall_closed, :memory_closed)
    expect(closes.values.sum).to be >= 1, "no shutdown counted: #{server.stats}"
    expect(server.stats[:unauthenticated]).to be < 20_000 # the flood was cut short, not served
    expect(good.register_processor(processor_id: "after").success).to be(true)
  ensure
    good&.close
  end

  it "a bidi stream whose client never reads: the handler's write raises Cancelled after write_timeout" do
    outcome = Queue.new
    writer = Class.new do
      define_method(:process) do |_requests, call|
        reply = Flowctl::Processor::DataMessage.new(payload: "x" * 16_384)
        loop { call.write(reply) }
      rescue Flowctl::Cancelled => e
        outcome << e
        raise
      end
    end
    server = serve(write_timeout: 0.5, pool_size: 1) { |s| s.handle(Flowctl::Processor::Service, writer.new) }
    peer = HostilePeer.new(server.port, rcvbuf: 4096)
    peer.write(peer.call_headers(1, PROCESS, end_stream: false))
    started = now
    error = Timeout.timeout(time_limit(10)) { outcome.pop }
    expect(error.message).to match(/read nothing/)
    expect(now - started).to be < time_limit(5)
    # the only worker is free again
    expect(client(server).register_processor(processor_id: "p").success).to be(true)
  ensure
    peer&.close
  end

  def rss_mb = File.read("/proc/self/status")[/VmRSS:\s+(\d+)/, 1].to_i / 1024

  it "HTTP/2 rapid reset (HEADERS + RST_STREAM, 60,000 streams): the connection is shut, memory stays bounded",
     **FLOOD do
    server = serve
    good = client(server, timeout: 5)
    expect(good.register_processor(processor_id: "before").success).to be(true)
    before = rss_mb
    peak = before
    flood = HostilePeer.spawn(<<~RUBY)
      peer = HostilePeer.new(#{server.port})
      sent = 0
      sent += 1000 while sent < 60_000 && peer.rapid_reset(1000, "#{REGISTER}")
      limit = Process.clock_gettime(Process::CLOCK_MONOTONIC) + #{time_limit(15)}
      sleep 0.05 until peer.closed_by_server? || Process.clock_gettime(Process::CLOCK_MONOTONIC) > limit
      puts peer.closed_by_server?
    RUBY
    peak = [peak, rss_mb].max while flood.alive? && sleep(0.05)
    expect(flood.value).to eq("true\n") # the server shut the connection (the peer kept it open)
    expect(server.stats.values_at(:stall_closed, :memory_closed, :abusive_closed).sum).to be >= 1
    expect(peak - before).to be < 650 # MB; measured 150-550 (what gRPC parsed before the cut); 771 before, never cut
    # serving again by itself: the calls the shut connection had queued in gRPC core still come
    # out for a while (about 2,000 a second here) and others may be refused meanwhile
    # (RESOURCE_EXHAUSTED: shed with a clear status) or wait (measured: 0.3-6 s on this loaded
    # 2-core machine, depending on how many streams gRPC had parsed before the cut)
    started = now
    begin
      expect(client(server, timeout: 1).register_processor(processor_id: "after").success).to be(true)
    rescue Flowctl::ResourceExhausted, Flowctl::DeadlineExceeded
      retry if now - started < time_limit(15) && sleep(0.05)
      raise
    end
  ensure
    good&.close
  end

  it "auth: the scheme in any case (RFC 6750), the whole token compared; wrong ones refused before any worker" do
    server = serve(auth_token: "s3cret")
    call = lambda do |value|
      c = Flowctl::ControlPlane::Client.new("127.0.0.1:#{server.port}", tls: false, timeout: time_limit(5),
                                                                         headers: { "authorization" => value })
      c.register_processor(processor_id: "p").success
    rescue Flowctl::Unauthenticated
      :refused
    ensure
      c&.close
    end
    expect(["Bearer s3cret", "bearer s3cret", "BEARER s3cret", "Bearer  s3cret"].map(&call)).to all(be(true))
    refused = ["Bearer s3cre", "Bearer s3cretX", "Bearer S3CRET", "Basic s3cret", "Bearer", "Bearers3cret", "s3cret",
               "Bearer s3cret "]
    expect(refused.map(&call)).to all(eq(:refused))
    expect(server.stats[:unauthenticated]).to eq(refused.size)
    expect(server.stats[:accepted]).to eq(4) # the refused calls never reached a worker
  end

  it "auth_token: a String without spaces or control characters" do
    expect { Flowctl::Server.new(auth_token: "a b") }.to raise_error(ArgumentError, /spaces/)
    expect { Flowctl::Server.new(auth_token: "") }.to raise_error(ArgumentError, /empty/)
    expect { Flowctl::Server.new(auth_token: :tok) }.to raise_error(TypeError)
  end

  describe "late writes: a handler returns while a thread it started still writes" do
    DM = Flowctl::Processor::DataMessage

    it "the client sees OK and what was written before the return; a write after it raises Cancelled" do
      late = Queue.new
      handler = Class.new do
        define_method(:process) do |_requests, call|
          call.write(DM.new(payload: "before"))
          Thread.new do
            sleep 0.2
            call.write(DM.new(payload: "late"))
            late << :written
          rescue Flowctl::Cancelled => e
            late << e
          end
          nil
        end
      end
      server = serve { |srv| srv.handle(Flowctl::Processor::Service, handler.new) }
      processor = Flowctl::Processor::Client.new("127.0.0.1:#{server.port}", tls: false, timeout: time_limit(5))
      stream = processor.process_stream
      stream.close_write
      replies = []
      while (r = stream.read)
        replies << r.payload
      end
      expect(replies).to eq(["before"])
      expect(late.pop.message).to match(/already finished/)
      processor.close
    end

    it "300 streams whose writer thread is mid-burst at the return: every one ends OK, none hangs" do
      handler = Class.new do
        define_method(:process) do |_requests, call|
          Thread.new do
            200.times { call.write(DM.new(payload: "x" * 512)) }
          rescue Flowctl::Cancelled
            nil
          end
          call.write(DM.new(payload: "first"))
          nil
        end
      end
      server = serve { |srv| srv.handle(Flowctl::Processor::Service, handler.new) }
      processor = Flowctl::Processor::Client.new("127.0.0.1:#{server.port}", tls: false, timeout: time_limit(10))
      outcomes = Array.new(ENV["GC_STRESS"] == "1" ? 10 : 300) do
        stream = processor.process_stream
        stream.close_write
        nil while stream.read
        :ok
      rescue Flowctl::RPCError => e
        e.class
      end
      expect(outcomes.tally).to eq(ok: outcomes.size)
      processor.close
    end
  end

  it "write_timeout: must be positive or nil" do
    expect { Flowctl::Server.new(write_timeout: 0) }.to raise_error(ArgumentError, /write_timeout/)
    expect { Flowctl::Server.new(write_timeout: -1) }.to raise_error(ArgumentError, /write_timeout/)
    expect(Flowctl::Server.new(write_timeout: nil)).to be_a(Flowctl::Server)
  end
end
