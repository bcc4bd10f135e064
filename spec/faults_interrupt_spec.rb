# frozen_string_literal: true

require "spec_helper"
require "timeout"

# Thread#raise, Timeout and SIGINT while the gem blocks in the calls the client specs do
# not cover: a stream write held by flow control (the server reads nothing), the block
# form of a bidi call, Server#stop waiting for a held call, and Heartbeat#stop while the
# control plane never answers. Each returns promptly with the interrupt, nothing hangs,
# and what was interrupted is usable (or closed) afterwards.
RSpec.describe "faults: interrupts during blocking calls" do
  class FaultsStuckHandler
    def initialize(release) = @release = release

    # reads nothing, so the client's writes fill the flow-control window and block
    def process(_requests, _call)
      OfficialServer.pop(@release, 20)
      []
    end

    def register_processor(_req, _call)
      OfficialServer.pop(@release, 20)
      Flowctl::ControlPlane::RegisterProcessorResponse.new(success: true)
    end

    def processor_heartbeat(_req, _call)
      OfficialServer.pop(@release, 20)
      Flowctl::ControlPlane::ProcessorHeartbeatResponse.new(success: true)
    end
  end

  before do
    @release = Queue.new
    @server = Flowctl::Server.new(host: "127.0.0.1", port: 0, tls: false, pool_size: 4)
    @server.handle(Flowctl::Processor::Service, FaultsStuckHandler.new(@release))
    @server.handle(Flowctl::ControlPlane::Service, FaultsStuckHandler.new(@release))
    @port = @server.start
  end

  after do
    20.times { @release << :go }
    Timeout.timeout(15) { @server.stop(grace: 0) }
  end

  def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  INTERRUPTS = {
    "Thread#raise" => lambda { |blk|
      t = Thread.new { blk.call }
      t.report_on_exception = false # the Interrupt is expected: join re-raises it below
      sleep 0.3
      t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      t.raise(Interrupt, "stop")
      expect { t.join(5) }.to raise_error(Interrupt)
      Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0
    },
    "Timeout.timeout" => lambda { |blk|
      t0 = nil
      expect { Timeout.timeout(0.3) { t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 0.3; blk.call } }
        .to raise_error(Timeout::Error)
      Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0
    },
    "SIGINT" => lambda { |blk|
      old = trap(:INT) { raise Interrupt, "ctrl-c" }
      begin
        killer = Thread.new { sleep 0.3; Process.kill(:INT, Process.pid) }
        t0 = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 0.3
        expect { blk.call }.to raise_error(Interrupt)
        killer.join
        Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0
      ensure
        # a block that ended before the signal must not leave it to reach RSpec (which stops the suite)
        killer&.kill&.join
        trap(:INT, old)
      end
    }
  }.freeze

  INTERRUPTS.each do |how, interrupt|
    context "by #{how}" do
      it "a stream write blocked by flow control returns at once, the client goes on" do
        pr = Flowctl::Processor::Client.new("127.0.0.1:#{@port}", tls: false)
        big = Flowctl::Processor::DataMessage.new(payload: "x" * (1024 * 1024))
        call = pr.process_stream(timeout: 30)
        writes = lambda do
          100.times { call.write(big) }
        rescue IOError => e # not expected: say which of the server's guards ended the call, if one did
          raise IOError, "#{e.message}; server stats #{@server.stats}; status #{call.status.inspect} #{call.details.inspect}"
        end
        took = instance_exec(writes, &interrupt)
        expect(took).to be < time_limit(1.0)
        call.cancel
        # the channel is still good: a new stream answers once the handler is released
        20.times { @release << :go }
        again = pr.process_stream(timeout: 10)
        again.close_write
        expect(again.read).to be_nil
      ensure
        pr&.close
      end

      it "the block form of a bidi call returns at once" do
        pr = Flowctl::Processor::Client.new("127.0.0.1:#{@port}", tls: false)
        requests = Enumerator.new { |y| loop { y << Flowctl::Processor::DataMessage.new(payload: "y" * 65_536) } }
        took = instance_exec(-> { pr.process(requests, timeout: 30) { |_| nil } }, &interrupt)
        expect(took).to be < time_limit(1.0)
      ensure
        pr&.close
      end

      it "Heartbeat#stop while the control plane never answers returns within its own timeout" do
        cp = Flowctl::ControlPlane::Client.new("127.0.0.1:#{@port}", tls: false)
        hb = cp.start_heartbeat(:processor, id: "stuck", interval: 0.1, timeout: 5)
        sleep 0.2
        t0 = now
        hb.stop(0.5)
        expect(now - t0).to be < time_limit(2.0)
        took = instance_exec(-> { cp.register_processor(processor_id: "p", timeout: 30) }, &interrupt)
        expect(took).to be < time_limit(1.0)
      ensure
        cp&.close
      end
    end
  end

  it "Server#stop(grace:) waiting for a held call can be cut short with Timeout, then stops for good" do
    client = Flowctl::ControlPlane::Client.new("127.0.0.1:#{@port}", tls: false)
    held = Thread.new { client.register_processor(processor_id: "p", timeout: 30) rescue $! }
    sleep 0.3
    t0 = now
    expect { Timeout.timeout(0.3) { @server.stop(grace: 10) } }.to raise_error(Timeout::Error)
    expect(now - t0).to be < time_limit(1.0)
    20.times { @release << :go }
    Timeout.timeout(10) { @server.stop(grace: 0) }
    expect(held.join(10)).to be_truthy
  ensure
    client&.close
  end
end
