# frozen_string_literal: true

require_relative "spec_helper"
require "open3"
require "socket"

# Process-level behaviour of the heartbeat thread: exit, at_exit, fork.
RSpec.describe "Flowctl::Heartbeat and the process" do

  def ruby_script(code, timeout: 20)
    t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    out, err, status = Open3.capture3(RbConfig.ruby, "-I#{FLOWCTL_LIB}", "-rflowctl", "-e", code)
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
      expect(cp.last_sent["status"]).to eq("STOPPING")
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

  # Each fork scenario runs in a fresh Ruby process: gRPC core can only prepare for a fork
  # when no other thread is inside gRPC, which this spec process (servers, official gem)
  # cannot promise.
  describe "fork", if: Flowctl::Native.fork_internals? do
    FORK_SCRIPT = <<~'RUBY'
      require "json"
      port = Integer(ARGV[0])
      channel = Flowctl::Native::Channel.new("127.0.0.1:#{port}", false, {})
      hb = Flowctl::Heartbeat.new(channel, :processor, id: "parent", interval: 0.1)
      sleep 0.3
      reader, writer = IO.pipe
      pid = fork do
        reader.close
        report = {
          usable: Flowctl::Native.grpc_usable?,
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
        ch = Flowctl::Native::Channel.new("127.0.0.1:#{port}", false, {})
        child = Flowctl::Heartbeat.new(ch, :source, id: "child", interval: 0.1, register: {endpoint: "c:1"})
        sleep 1.5
        report[:child_stop] = child.stop
        report[:child] = child.stats.slice(:sent, :registrations, :failed, :last_error)
        writer.write(JSON.generate(report))
        writer.close
        exit!(0)
      end
      writer.close
      report = JSON.parse(reader.read)
      Process.wait(pid)
      report["child_exit"] = $?.exitstatus
      forked_at = hb.stats[:sent]
      sleep 1.5
      report["parent_after_fork"] = hb.stats[:sent] - forked_at
      report["parent_failed"] = hb.stats[:failed]
      report["parent_failures"] = hb.stats[:consecutive_failures]
      report["parent_error"] = hb.stats[:last_error]
      report["parent_running"] = hb.running?
      hb.stop
      puts JSON.generate(report)
    RUBY

    it "leaves the child without the parent's heartbeat; the child beats on its own; the parent keeps beating" do
      cp = RecordingControlPlane.start
      out, err, status, took = ruby_script(FORK_SCRIPT.sub("Integer(ARGV[0])", cp.port.to_s))
      expect(status).to be_success, err
      expect(took).to be < 10
      r = JSON.parse(out.lines.last)
      puts r.inspect if ENV["FLOWCTL_DEBUG"]
      expect(r).to include("usable" => true, "inherited_running" => false, "live" => 0, "stop" => true,
                           "child_stop" => true, "child_exit" => 0, "parent_running" => true, "parent_failures" => 0)
      expect(r["old_channel"]).to match(/created before fork/)
      expect(r["child"]).to include("registrations" => 1)
      expect(r["child"]["sent"]).to be >= 3
      expect(r["parent_after_fork"]).to be >= 8 # ~15 in 1.5 s at 10 Hz

      expect(cp.wait_for(2) { |evs| evs.any? { |e| e["id"] == "child" && e["status"] == "STOPPING" } }).to be(true)
      expect(cp.events("register_source").map { |e| e["id"] }).to eq(["child"])
      expect(cp.events("source_heartbeat").map { |e| e["id"] }.uniq).to eq(["child"])
      expect(cp.events("processor_heartbeat").map { |e| e["id"] }.uniq).to eq(["parent"])
    ensure
      cp&.kill
    end

    it "tells the child clearly, without hanging, when gRPC core could not prepare for the fork" do
      code = <<~RUBY
        $LOAD_PATH.unshift(#{File.expand_path("gen", __dir__).inspect})
        require "grpc"
        require "controlplane/controlplane_services_pb"
        # the official gem keeps a thread inside gRPC once it has a channel
        stub = Obsrvr::Flow::Controlplane::ControlPlane::Stub.new("127.0.0.1:#{free_port}", :this_channel_is_insecure)
        stub.processor_heartbeat(Obsrvr::Flow::Controlplane::ProcessorHeartbeatRequest.new, deadline: Time.now + 0.2) rescue nil
        pid = fork do
          begin
            Flowctl::Native::Channel.new("127.0.0.1:1", false, {})
            puts "channel created"
          rescue Flowctl::Error => e
            puts e.message
          end
          $stdout.flush
          exit!(0)
        end
        Process.wait(pid)
      RUBY
      out, err, status, took = ruby_script(code)
      expect(status).to be_success, err
      expect(out).to match(/gRPC cannot be used in this forked child: .*a thread was inside gRPC core/)
      expect(took).to be < 10
    end

    it "reports gRPC core fork support as on" do
      expect(Flowctl::Native.fork_support?).to be(true)
    end
  end
end
