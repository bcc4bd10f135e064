# frozen_string_literal: true

require "spec_helper"
require "timeout"

# Unary calls on Flowctl::Server's own path (ext/flowctl/server_unary.c): their batches
# complete on the acceptor's queue, the worker finds the request read and starts the status
# without waiting; workers take queued calls one after the other and an idle one is woken
# only when needed. What a handler sees and what a client gets must be as for any call.
RSpec.describe "Flowctl::Server unary calls" do
  before(:all) do
    Official.load!
    # one call from each client here, outside GC.stress: what they load on first use is not parsed under it
    warm = Flowctl::Server.new(port: 0, tls: false)
    warm.handle(Flowctl::ControlPlane::Service, Class.new { def register_processor(_req, _call) = {} }.new)
    warm.start
    client = Flowctl::ControlPlane::Client.new("127.0.0.1:#{warm.port}", tls: false)
    client.register_processor(processor_id: "warm")
    Obsrvr::Flow::Controlplane::ControlPlane::Stub.new("127.0.0.1:#{warm.port}", :this_channel_is_insecure)
      .register_processor(Obsrvr::Flow::Controlplane::RegisterProcessorRequest.new, return_op: true).execute
  ensure
    client&.close
    warm&.stop(grace: 0.5)
  end

  let(:cp) { Obsrvr::Flow::Controlplane }
  let(:servers) { [] }
  after { servers.each { |s| s.stop(grace: 0.5) } }

  # A control plane whose RegisterProcessor runs the example's block.
  let(:scripted) do
    Class.new do
      def initialize(&blk) = @blk = blk
      def register_processor(req, call) = @blk.call(req, call)
    end
  end

  def serve(opts = {}, &blk)
    server = Flowctl::Server.new(port: 0, tls: false, **opts)
    server.handle(Flowctl::ControlPlane::Service, scripted.new(&blk))
    servers << server
    server.start
    server
  end

  def stub(server) = cp::ControlPlane::Stub.new("127.0.0.1:#{server.port}", :this_channel_is_insecure)

  def flowctl_client(server, **opts)
    Flowctl::ControlPlane::Client.new("127.0.0.1:#{server.port}", tls: false, **opts)
  end

  def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  it "sends the trailing metadata a handler sets with its reply" do
    server = serve do |req, call|
      if req.processor_id == "assign"
        call.trailing_metadata = { "x-set" => "1" }
      else
        call.trailing_metadata["x-added"] = req.processor_id
      end
      { processor_id: req.processor_id, success: true }
    end
    %w[assign filled].each do |id|
      op = stub(server).register_processor(cp::RegisterProcessorRequest.new(processor_id: id), return_op: true)
      expect(op.execute.processor_id).to eq(id)
      expect(op.trailing_metadata).to include(id == "assign" ? { "x-set" => "1" } : { "x-added" => "filled" })
    end
  end

  it "tells a handler that its client went away (cancelled?), and the worker serves again" do
    seen = Queue.new
    server = serve(pool_size: 1) do |req, call|
      next { success: true } unless req.processor_id == "wait"

      limit = now + time_limit(5)
      sleep 0.01 until call.cancelled? || now > limit
      seen << call.cancelled?
      { success: true }
    end
    client = flowctl_client(server)
    expect { client.register_processor(processor_id: "wait", timeout: 0.3) }.to raise_error(Flowctl::DeadlineExceeded)
    expect(Timeout.timeout(time_limit(5)) { seen.pop }).to be(true)
    expect(client.register_processor(processor_id: "after").success).to be(true)
  ensure
    client&.close
  end

  it "serves a call at once while the other worker's handler is held" do
    release = Queue.new
    server = serve(pool_size: 2) do |req, _call|
      release.pop if req.processor_id == "held"
      { processor_id: req.processor_id, success: true }
    end
    client = flowctl_client(server, timeout: time_limit(10))
    held = Thread.new { client.register_processor(processor_id: "held") }
    sleep 0.2 # the held call has its worker
    started = now
    5.times { |i| expect(client.register_processor(processor_id: "p#{i}").success).to be(true) }
    expect(now - started).to be < time_limit(2)
    release << :go
    expect(held.value.processor_id).to eq("held")
  ensure
    release << :go
    client&.close
  end

  it "answers every call of a burst far larger than the pool, none refused, each with its own reply" do
    server = serve(pool_size: 2, max_waiting: 1000, max_wait: time_limit(10)) do |req, _call|
      { processor_id: req.processor_id, success: true }
    end
    client = flowctl_client(server, timeout: time_limit(20))
    threads, calls = ENV["GC_STRESS"] == "1" ? [4, 5] : [8, 50] # under GC.stress every allocation is a full GC
    replies = Array.new(threads) do |t|
      Thread.new { Array.new(calls) { |i| client.register_processor(processor_id: "#{t}-#{i}").processor_id } }
    end.flat_map(&:value)
    expect(replies).to eq(Array.new(threads) { |t| Array.new(calls) { |i| "#{t}-#{i}" } }.flatten)
    expect(server.stats[:rejected]).to eq(0)
  ensure
    client&.close
  end

  it "stops cleanly when a handler outlives its client's connection" do
    release = Queue.new
    entered = Queue.new
    server = serve do |_req, _call|
      entered << true
      release.pop
      { success: true }
    end
    client = flowctl_client(server)
    caller = Thread.new { client.register_processor(processor_id: "gone", timeout: time_limit(10)) rescue $! }
    Timeout.timeout(time_limit(5)) { entered.pop }
    client.close # the connection ends while the handler still holds the call
    caller.join(time_limit(5))
    Thread.new { sleep 0.3; release << :go }
    started = now
    expect { server.stop(grace: time_limit(5)) }.not_to output(/calls still hold/).to_stderr
    expect(now - started).to be < time_limit(5)
    expect(server.stats[:lingering]).to eq(0)
  end

  it "registers each unary method once, before the server starts" do
    native = Flowctl::Native::Server.new({})
    native.register_unary("/obsrvr.flow.controlplane.ControlPlane/RegisterProcessor")
    expect { native.register_unary("/obsrvr.flow.controlplane.ControlPlane/RegisterProcessor") }
      .to raise_error(ArgumentError, /registered already/)
    native.close
  end
end
