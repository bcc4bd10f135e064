# frozen_string_literal: true

require_relative "spec_helper"
require "open3"
require "socket"

# Process-level behaviour of the heartbeat thread: exit, at_exit, fork.
RSpec.describe "Flowctl::Heartbeat and the process" do
  LIB = File.expand_path("../lib", __dir__)

  def ruby_script(code, timeout: 20)
    t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    out, err, status = Open3.capture3(RbConfig.ruby, "-I#{LIB}", "-rflowctl", "-e", code)
    [out, err, status, Process.clock_gettime(Process::CLOCK_MONOTONIC) - t]
  end

  def free_port
    s = TCPServer.new("127.0.0.1", 0)
    s.addr[1]
  ensure
    s&.close
  end

  describe "at exit" do
    it "stops a running heartbeat with a final STOPPING beat" do
      cp = RecordingControlPlane.start
      code = <<~RUBY
        ch = Flowctl::Native::Channel.new("127.0.0.1:#{cp.port}", false, {})
        $hb = Flowctl::Heartbeat.new(ch, :processor, id: "exiting", interval: 0.1)
        sleep 0.35
      RUBY
      _out, err, status, took = ruby_script(code)
      expect(status).to be_success, err
      expect(took).to be < 5
      expect(cp.wait_for(2) { |evs| evs.any? { |e| e["status"] == "STOPPING" } }).to be(true)
      expect(cp.events.map { |e| e["status"] }.last).to eq("STOPPING")
      expect(cp.events.size).to be >= 3
    ensure
      cp&.kill
    end

    it "does not hang when the control plane is unreachable" do
      code = <<~RUBY
        ch = Flowctl::Native::Channel.new("127.0.0.1:#{free_port}", false, {})
        hbs = 3.times.map { |i| Flowctl::Heartbeat.new(ch, :source, id: "s\#{i}", interval: 5) }
        sleep 0.2
        puts hbs.map { |h| h.stats[:sent] }.sum
      RUBY
      out, err, status, took = ruby_script(code)
      expect(status).to be_success, err
      expect(out.strip).to eq("0")
      expect(took).to be < 4 # ~0.2 s of work + a bounded (0.5 s) stop; Ruby boot included
    end

    it "does not hang when the control plane accepts connections but never answers" do
      hole = TCPServer.new("127.0.0.1", 0)
      conns = []
      acceptor = Thread.new { loop { conns << hole.accept } }
      code = <<~RUBY
        ch = Flowctl::Native::Channel.new("127.0.0.1:#{hole.addr[1]}", false, {})
        hb = Flowctl::Heartbeat.new(ch, :consumer, id: "c", interval: 5, timeout: 5)
        sleep 0.3
        puts hb.stats[:failed]
      RUBY
      out, err, status, took = ruby_script(code)
      expect(status).to be_success, err
      expect(out.strip).to eq("0") # the first beat is still waiting for its 5 s deadline
      expect(took).to be < 4
    ensure
      acceptor&.kill
      conns&.each(&:close)
      hole&.close
    end
  end

  describe "fork" do
    it "leaves the child without the parent's heartbeat; the child beats on its own; the parent keeps beating" do
      cp = RecordingControlPlane.start
      channel = Flowctl::Native::Channel.new("127.0.0.1:#{cp.port}", false, {})
      hb = Flowctl::Heartbeat.new(channel, :processor, id: "parent", interval: 0.1)
      expect(cp.wait_for(5) { |evs| evs.any? { |e| e["id"] == "parent" } }).to be(true)

      reader, writer = IO.pipe
      pid = fork do
        reader.close
        report = {
          inherited_running: hb.running?,
          live: Flowctl::Heartbeat.live_count,
          stop: hb.stop,
          old_channel: (begin
            Flowctl::Heartbeat.new(channel, :source, id: "x", interval: 1)
            "usable"
          rescue IOError => e
            e.message
          end)
        }
        ch = Flowctl::Native::Channel.new("127.0.0.1:#{cp.port}", false, {})
        child = Flowctl::Heartbeat.new(ch, :source, id: "child", interval: 0.1, register: {endpoint: "c:1"})
        sleep 0.6
        child.stop
        report[:child_stats] = child.stats.slice(:sent, :registrations)
        writer.write(Marshal.dump(report))
        writer.close
        exit!(0)
      end
      writer.close
      report = Marshal.load(reader.read) # rubocop:disable Security/MarshalLoad
      Process.wait(pid)
      expect($?).to be_success

      expect(report[:inherited_running]).to be(false)
      expect(report[:live]).to eq(0)
      expect(report[:stop]).to be(true)
      expect(report[:old_channel]).to match(/created before fork/)
      expect(report[:child_stats][:sent]).to be >= 3
      expect(report[:child_stats][:registrations]).to eq(1)
      expect(cp.wait_for(2) { |evs| evs.any? { |e| e["id"] == "child" && e["status"] == "STOPPING" } }).to be(true)
      expect(cp.events("register_source").map { |e| e["id"] }).to eq(["child"])

      # the parent's heartbeat kept beating through the fork, on its own connection
      forked_at = Time.now.to_f
      before = hb.stats[:sent]
      expect(cp.wait_for(3) { |evs| evs.count { |e| e["id"] == "parent" && e["at"] > forked_at } >= 5 }).to be(true)
      expect(hb).to be_running
      st = hb.stats
      expect(st[:sent]).to be >= before + 4 # the last reply may still be on its way
      expect(st[:consecutive_failures]).to eq(0)
      hb.stop
      channel.close
    ensure
      cp&.kill
    end

    it "reports gRPC core fork support as on" do
      expect(Flowctl::Native.fork_support?).to be(true)
    end
  end
end
