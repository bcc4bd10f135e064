# frozen_string_literal: true

require "spec_helper"

begin
  require "async"
rescue LoadError
  nil
end

# Under a Fiber scheduler (the async gem) a call yields to the scheduler instead of blocking
# its thread (lib/flowctl/fiber_calls.rb, ext/flowctl/fiber.c).
RSpec.describe "Flowctl clients under a Fiber scheduler", if: defined?(Async) do
  # Holds every call until the test opens the gate; counts the calls that arrived.
  class GatedRegistry
    attr_reader :arrived

    def initialize
      @gate = Queue.new
      @arrived = 0
      @lock = Mutex.new
    end

    def open(n) = n.times { @gate << true }

    def register_processor(req, _call)
      @lock.synchronize { @arrived += 1 }
      @gate.pop
      { processor_id: req.processor_id, success: true }
    end

    def processor_heartbeat(req, _call)
      sleep Float(req.status) # a slow server: status carries the seconds
      { success: true }
    end
  end

  before(:all) do
    @handler = GatedRegistry.new
    @server = Flowctl::Server.new(port: 0, tls: false, pool_size: 16, max_waiting: 2000, max_wait: 60)
    @server.handle(Flowctl::ControlPlane::Service, @handler)
    @server.start
    @client = Flowctl::ControlPlane::Client.new("127.0.0.1:#{@server.port}", tls: false, timeout: 60)
  end

  after(:all) do
    @handler&.open(5000)
    @client&.close
    @server&.stop(grace: 1)
  end

  def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  # (50 under GC.stress or valgrind, where each allocation costs a full GC)
  n = ENV["GC_STRESS"] == "1" || ENV["FLOWCTL_MEMCHECK"] ? 50 : 1000

  it "has 1,000 calls from 1,000 fibers in flight at once on one thread, other fibers running meanwhile" do
    in_flight = max_in_flight = ticks = ticks_while_waiting = 0
    ids = nil
    Sync do |task|
      ticker = task.async { loop { sleep 0.01; ticks += 1 } }
      calls = Array.new(n) do |i|
        task.async do
          in_flight += 1
          max_in_flight = [max_in_flight, in_flight].max
          @client.register_processor(processor_id: "f#{i}").processor_id
        ensure
          in_flight -= 1
        end
      end
      # every call has started: the server holds them until the gate opens
      task.sleep 0.01 until max_in_flight == n || ticks > 3000
      ticks_before = ticks
      task.sleep 0.2
      ticks_while_waiting = ticks - ticks_before # the ticker runs while 1,000 calls wait
      @handler.open(n)
      ids = calls.map(&:wait)
      ticker.stop
    end
    expect(max_in_flight).to eq(n)
    expect(ticks_while_waiting).to be > 0
    expect(ids).to eq(Array.new(n) { |i| "f#{i}" })
    expect(Thread.list.map(&:name)).to include("flowctl-fibers")
  end

  # (not under valgrind: it lacks epoll_pwait2, which the async gem's selector waits with, and
  # wake-ups of the reactor from another thread then come late)
  it "runs concurrent calls concurrently: three 0.5 s calls take about 0.5 s, not 1.5 s",
     skip: ENV["FLOWCTL_MEMCHECK"] && "valgrind lacks epoll_pwait2 (async's selector)" do
    t0 = now
    Sync do |task|
      3.times.map { task.async { @client.processor_heartbeat(processor_id: "p", status: "0.5").success } }.map(&:wait)
    end
    expect(now - t0).to be < time_limit(1.2)
  end

  it "fires with_timeout on time and cancels the call; the client stays usable" do
    t0 = now
    # (errors are caught inside and checked outside the reactor: async 2.x reads files through the
    # scheduler with IO#timeout, which Ruby 3.1 lacks, and RSpec's matchers read files)
    error = Sync do |task|
      task.with_timeout(0.1) { @client.processor_heartbeat(processor_id: "p", status: "3") }
    rescue Async::TimeoutError => e
      e
    end
    expect(error).to be_a(Async::TimeoutError)
    expect(now - t0).to be < time_limit(1.0)
    expect(Sync { @client.processor_heartbeat(processor_id: "p", status: "0").success }).to be(true)
  end

  describe "streams" do
    # Server streaming replies 0.2 s apart (Shapes::Echo with a pause), on a server of its own.
    before(:all) do
      slow = Class.new(Shapes::Echo) do
        def server_stream(req, _call = nil)
          Integer(req.metadata["count"]).times do |i|
            sleep Float(req.metadata["pause"])
            yield @klass.new(payload: req.payload, metadata: { "i" => i.to_s })
          end
          nil
        end
      end
      @stream_server = Flowctl::Server.new(port: 0, tls: false)
      @stream_server.handle(Shapes.service, slow.new(Flowctl::Processor::DataMessage, ->(c, m) { raise Flowctl::RPCError.new(m, code: c) }))
      @stream_server.start
      @shapes = Shapes.client("127.0.0.1:#{@stream_server.port}")
    end

    after(:all) do
      @shapes&.close
      @stream_server&.stop(grace: 0.5)
    end

    it "reads replies without blocking the thread: other fibers run, two streams overlap" do
      ticks = 0
      t0 = now
      counts = Sync do |task|
        ticker = task.async { loop { sleep 0.01; ticks += 1 } }
        streams = 2.times.map do
          task.async { @shapes.server_stream(payload: "s", metadata: { "count" => "3", "pause" => "0.2" }).to_a.size }
        end
        streams.map(&:wait).tap { ticker.stop }
      end
      expect(counts).to eq([3, 3])
      expect(now - t0).to be < time_limit(1.1) # 0.6 s each, at once
      expect(ticks).to be > 10
    end

    it "cancels a stream when with_timeout fires during a read" do
      t0 = now
      error = Sync do |task|
        task.with_timeout(0.1) { @shapes.server_stream(payload: "s", metadata: { "count" => "1", "pause" => "3" }).to_a }
      rescue Async::TimeoutError => e
        e
      end
      expect(error).to be_a(Async::TimeoutError)
      expect(now - t0).to be < time_limit(1.0)
    end
  end

  it "raises the call's status in its fiber" do
    error = Sync do
      @client.processor_heartbeat(processor_id: "p", status: "1", timeout: 0.05)
    rescue Flowctl::RPCError => e
      e
    end
    expect(error).to be_a(Flowctl::DeadlineExceeded)
  end

  it "blocks as before in a blocking fiber or without a scheduler" do
    expect(@client.processor_heartbeat(processor_id: "p", status: "0").success).to be(true)
    inside = Sync { [Fiber.new(blocking: true) { Flowctl::FiberCalls.scheduled? }.resume, Flowctl::FiberCalls.scheduled?] }
    expect(inside.map { |x| x ? true : false }).to eq([false, true])
  end
end
