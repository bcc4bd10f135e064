# frozen_string_literal: true

require "spec_helper"
require "etc"
require "open3"
require "rbconfig"

# A unary call on a channel that has been answering fast looks for its reply without
# sleeping for a moment before it sleeps (ext/flowctl/wait.c, "Spinning"): the limit and
# its checks, where spinning happens and where it must not, and that answers and
# interrupts are unchanged by it.
RSpec.describe "Flowctl unary calls: spinning before sleeping" do
  before(:all) do
    @handler = Class.new do
      attr_accessor :delay

      def register_processor(req, _call)
        sleep(delay) if delay
        Flowctl::ControlPlane::RegisterProcessorResponse.new(processor_id: req.processor_id, success: true)
      end
    end.new
    @server = Flowctl::Server.new(host: "127.0.0.1", port: 0, tls: false)
    @server.handle(Flowctl::ControlPlane::Service, @handler)
    @target = "127.0.0.1:#{@server.start}"
  end

  after(:all) { @server&.stop(grace: 1) }

  around do |example|
    saved = Flowctl.unary_spin_us
    example.run
  ensure
    Flowctl.unary_spin_us = saved
    @handler.delay = nil
  end

  let(:client) { Flowctl::ControlPlane::Client.new(@target, tls: false, timeout: 5) }

  after { client.close }

  def calls(n, from = 0) = Array.new(n) { |i| client.register_processor(processor_id: "p#{from + i}").processor_id }
  def spins = Flowctl::Native.spin_stats[:started]

  it "has a limit in microseconds, 100 by default, that takes Integers from 0 to 10000 only" do
    expect(Flowctl.unary_spin_us).to eq(100) unless ENV["FLOWCTL_SPIN_US"]
    Flowctl.unary_spin_us = 0
    expect(Flowctl.unary_spin_us).to eq(0)
    Flowctl.unary_spin_us = 10_000
    expect(Flowctl.unary_spin_us).to eq(10_000)
    expect { Flowctl.unary_spin_us = -1 }.to raise_error(ArgumentError, /from 0 to 10000 microseconds \(given -1\)/)
    expect { Flowctl.unary_spin_us = 10_001 }.to raise_error(ArgumentError, /given 10001/)
    expect { Flowctl.unary_spin_us = "50" }.to raise_error(TypeError, /Integer number of microseconds \(given String\)/)
    expect { Flowctl.unary_spin_us = 50.5 }.to raise_error(TypeError, /given Float/)
    expect(Flowctl.unary_spin_us).to eq(10_000)
  end

  it "reads FLOWCTL_SPIN_US when the gem loads, and names a bad value" do
    lib = File.expand_path("../lib", __dir__)
    out, status = Open3.capture2e({"FLOWCTL_SPIN_US" => "250"}, RbConfig.ruby, "-I", lib, "-rflowctl",
                                  "-e", "print Flowctl.unary_spin_us")
    expect([out, status.success?]).to eq(["250", true])
    out, status = Open3.capture2e({"FLOWCTL_SPIN_US" => "fast"}, RbConfig.ruby, "-I", lib, "-rflowctl", "-e", "1")
    expect(status.success?).to be(false)
    expect(out).to include("FLOWCTL_SPIN_US must be a number of microseconds from 0 to 10000 (given fast)")
  end

  it "spins on a channel that answers within the limit, and every answer is the right one",
     skip: (if Etc.nprocessors < 2 then "needs 2 CPUs: on one CPU nothing spins"
            elsif ENV["GC_STRESS"] == "1" then "under GC.stress every round trip outlasts any spin limit"
            else false
            end) do
    Flowctl.unary_spin_us = 5000 # generous, so that a loaded machine still shows it
    before = spins
    expect(calls(300)).to eq(Array.new(300) { |i| "p#{i}" })
    expect(spins - before).to be > 100
  end

  it "does not spin when the limit is 0" do
    Flowctl.unary_spin_us = 0
    before = spins
    expect(calls(200)).to eq(Array.new(200) { |i| "p#{i}" })
    expect(spins).to eq(before)
  end

  it "does not spin on a channel that answers slower than the limit" do
    Flowctl.unary_spin_us = 100
    @handler.delay = 0.002
    calls(5) # the channel's round trips are now about 2 ms
    before = spins
    expect(calls(30, 5)).to eq(Array.new(30) { |i| "p#{i + 5}" })
    expect(spins).to eq(before)
  end

  it "is interrupted like any wait: Thread#raise during spinning calls cancels the call, and the client goes on" do
    Flowctl.unary_spin_us = 10_000
    @handler.delay = 0.003 # each call spins for up to about 4.5 ms before it sleeps
    calls(5)
    stop = Class.new(StandardError)
    caller_thread = Thread.new do
      Thread.handle_interrupt(stop => :never) do
        Thread.current[:ready] = true
        Thread.handle_interrupt(stop => :immediate) { loop { client.register_processor(processor_id: "spin") } }
      end
    rescue stop
      :interrupted
    end
    Thread.pass until caller_thread[:ready]
    sleep 0.02
    caller_thread.raise(stop)
    expect(caller_thread.join(time_limit(2))&.value).to eq(:interrupted)
    @handler.delay = nil
    expect(calls(3)).to eq(%w[p0 p1 p2])
  end
end
