# frozen_string_literal: true

require "spec_helper"
require "timeout"

# A server that accepts calls and never answers (until the client cancels): every way
# Ruby interrupts a thread must return control within 100 ms, cancel the call (the
# server side of a stream sees it end) and leave the client usable.
RSpec.describe "Flowctl clients: interrupting blocked calls" do
  Official.load!
  cp = Obsrvr::Flow::Controlplane

  interrupt = Class.new(StandardError)
  limit = 0.1

  before(:all) do
    @arrived = Queue.new
    @release = Queue.new
    @ended = Queue.new
    arrived = @arrived
    release = @release
    ended = @ended
    # The official gem never tells a unary handler that its call was cancelled, so hung
    # unary handlers wait for a release (after each example); a bidi handler's reads end
    # when the client cancels, which the stream example checks.
    hang = lambda do
      arrived << true
      OfficialServer.pop(release, 10)
    end
    handler = OfficialServer::Handler.new(
      register_processor: ->(_req, _call) { hang.call; cp::RegisterProcessorResponse.new },
      register_source: ->(req, _call) { cp::RegisterSourceResponse.new(source_id: req.source_id, success: true) },
      processor_heartbeat: ->(req, _call) { sleep Float(req.status); cp::ProcessorHeartbeatResponse.new(success: true) }
    )
    processor = OfficialServer::Handler.new(process: lambda { |reqs, _call|
      Enumerator.new do |_y|
        arrived << true
        begin
          reqs.each { nil }
        rescue StandardError
          nil
        end
        ended << true
      end
    })
    @server = OfficialServer.new(pool_size: 50)
    @port = @server.start(handler_for_controlplane: handler, handler_for_processor: processor, tls: false)
  end

  after(:all) { @server&.stop }

  before do
    @arrived.clear
    @ended.clear
    @release.clear
  end

  after do
    50.times { @release << true }
    sleep 0.05
  end

  let(:client) { Flowctl::ControlPlane::Client.new("127.0.0.1:#{@port}", tls: false, timeout: 30) }

  after { client.close }

  def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  # Starts a call that blocks in a new thread; returns the thread once the server has it.
  def blocked_call(&blk)
    t = Thread.new do
      Thread.current.report_on_exception = false
      blk ? blk.call : client.register_processor(processor_id: "hang")
    end
    expect(OfficialServer.pop(@arrived, 5)).to be(true)
    sleep 0.05 # well inside the wait
    t
  end

  def expect_usable
    expect(client.register_source(source_id: "after").source_id).to eq("after")
  end

  # Runs the block (which interrupts a blocked call and returns how long control took to
  # come back) until once within limit, three times at most: a call that cannot be
  # interrupted takes its 30 s deadline every time; a machine busy with other work can
  # delay any one return past 100 ms (CI: 154 ms once at load 9).
  def expect_prompt(limit)
    took = Array.new(3) do
      t = yield
      break [t] if t < limit

      t
    end
    expect(took.min).to be < limit, "took #{took.map { |t| format('%.3f s', t) }.join(', ')}"
  end

  it "Thread#raise returns within 100 ms" do
    expect_prompt(limit) do
      t = blocked_call
      t0 = now
      t.raise(interrupt, "stop")
      expect { t.join }.to raise_error(interrupt, "stop")
      now - t0
    end
    expect_usable
  end

  it "Thread#kill returns within 100 ms" do
    expect_prompt(limit) do
      t = blocked_call
      t0 = now
      t.kill
      expect(t.join(1)).to be(t)
      expect(t).not_to be_alive
      now - t0
    end
    expect_usable
  end

  it "Timeout.timeout returns within 100 ms of its limit" do
    expect_prompt(0.3 + limit) do
      t0 = now
      expect { Timeout.timeout(0.3) { client.register_processor(processor_id: "hang") } }.to raise_error(Timeout::Error)
      now - t0
    end
    expect_usable
  end

  it "Ctrl-C (SIGINT with a trap that raises) returns within 100 ms" do
    old = trap(:INT) { raise interrupt, "ctrl-c" }
    expect_prompt(limit) do
      t0 = nil
      killer = Thread.new do
        OfficialServer.pop(@arrived, 5)
        sleep 0.05
        t0 = now
        Process.kill(:INT, Process.pid)
      end
      expect { client.register_processor(processor_id: "hang") }.to raise_error(interrupt, "ctrl-c")
      took = now - t0
      killer.join
      took
    end
    expect_usable
  ensure
    trap(:INT, old)
  end

  it "a signal whose trap raises nothing does not disturb the call" do
    hits = 0
    old = trap(:USR2) { hits += 1 }
    signaller = Thread.new do
      sleep 0.1
      3.times { Process.kill(:USR2, Process.pid); sleep 0.05 }
    end
    expect(client.processor_heartbeat(status: "0.5").success).to be(true)
    signaller.join
    expect(hits).to eq(3)
  ensure
    trap(:USR2, old)
  end

  it "interrupts a blocked stream read and cancels the stream" do
    pc = Flowctl::Processor::Client.new("127.0.0.1:#{@port}", tls: false)
    expect_prompt(limit) do
      call = pc.process_stream
      call << Flowctl::Processor::DataMessage.new(payload: "x")
      t = blocked_call { call.read }
      t0 = now
      t.raise(interrupt)
      expect { t.join }.to raise_error(interrupt)
      took = now - t0
      expect(OfficialServer.pop(@ended, 5)).to be(true) # the server saw the stream end
      expect { call.read }.to raise_error(Flowctl::Cancelled)
      expect(call.status).to eq(Flowctl::Cancelled::CODE)
      took
    end
  ensure
    pc&.close
  end

  it "survives many interrupted calls in a row (nothing left in flight)" do
    30.times do
      expect { Timeout.timeout(0.05) { client.register_processor(processor_id: "hang") } }.to raise_error(Timeout::Error)
    end
    expect(client.register_source(source_id: "still").source_id).to eq("still")
  end
end
