# frozen_string_literal: true

require "logger"

module Flowctl
  # gRPC core's own log lines. By default flowctl drops them (GRPC_VERBOSITY=debug|info|error
  # prints them on stderr, as gRPC does). With a Logger set they go to it instead, from a
  # Ruby thread named "flowctl-log", with progname "grpc":
  #
  #   Flowctl.logger = Logger.new($stderr, level: :info)   # gRPC's INFO and ERROR lines
  #   Flowctl.logger = nil                                   # drop them again
  #
  # The logger's level when it is set decides what gRPC core sends (DEBUG, INFO, or
  # ERROR and above); set the logger again after changing its level.
  module GrpcLog
    SEVERITIES = [Logger::DEBUG, Logger::INFO, Logger::ERROR].freeze

    class << self
      attr_reader :logger

      def logger=(logger)
        unless logger.nil? || %i[add level].all? { |m| logger.respond_to?(m) }
          raise TypeError, "Flowctl.logger must be a Logger (or respond to #add and #level) or nil (given #{logger.class})"
        end

        @logger = logger
        if logger
          Native.log_to_ruby(native_severity(logger.level))
          start_reader
        else
          Native.log_to_ruby(nil)
        end
      end

      # After fork: the reader thread is the parent's.
      def after_fork
        @reader = nil
        start_reader if @logger
      end

      private

      # gRPC core has three severities; a Logger level above ERROR (FATAL, UNKNOWN) still
      # gets its ERROR lines, as nothing else would ever reach it.
      def native_severity(level)
        level <= Logger::DEBUG ? 0 : level <= Logger::INFO ? 1 : 2
      end

      def start_reader
        return if @reader&.alive?

        @reader = Thread.new do
          Thread.current.report_on_exception = false
          while @logger
            line = Native.log_next
            deliver(*line) if line
          end
        end
        @reader.name = "flowctl-log"
      end

      def deliver(severity, text, dropped)
        logger = @logger or return
        logger.add(Logger::WARN, "#{dropped} gRPC log line(s) dropped (the logger did not keep up)", "grpc") if dropped.positive?
        logger.add(SEVERITIES.fetch(severity), text, "grpc")
      rescue StandardError => e
        warn "flowctl: Flowctl.logger raised #{e.class}: #{e.message}"
      end
    end
  end

  class << self
    # The Logger that receives gRPC core's log lines (nil: dropped). See Flowctl::GrpcLog.
    def logger = GrpcLog.logger

    def logger=(logger)
      GrpcLog.logger = logger
    end
  end

  # Restarts the log reader in a forked child (its threads are not copied).
  module ForkLogReader
    def _fork
      pid = super
      GrpcLog.after_fork if pid.zero?
      pid
    end
  end
  Process.singleton_class.prepend(ForkLogReader)
end
